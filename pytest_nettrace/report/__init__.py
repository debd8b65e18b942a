"""The reporting room: failure timelines, the terminal section, gates, the
events files (JSON lines) and where captures are kept."""
