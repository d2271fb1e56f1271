"""Command-line entry points: `gigafactory <command>`; each command lives in its own module."""
