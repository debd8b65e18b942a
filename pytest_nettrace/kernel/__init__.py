"""The kernel room: libbpf through ctypes, feature detection, the minimal
CO-RE BTF, kernel symbols, the ring buffer and the engine that loads the
probes' programs and routes their records to the traces watching."""
