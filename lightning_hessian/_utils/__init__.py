"""Private helpers shared across the packages: seeded random probes and small statistics."""
