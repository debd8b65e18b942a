pytest_plugins = ["pytester"]


# -- reliability harness (tests/test_reliability*.py) -------------------------

def pytest_addoption(parser):
    parser.addoption("--nettrace-long", action="store_true", default=False,
                     help="run the long variants of the reliability tests (200-test leak suite, longer floods)")
