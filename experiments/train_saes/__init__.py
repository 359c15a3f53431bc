"""SAEs for every layer of the embedded facts-world models (README.md has the command)."""
