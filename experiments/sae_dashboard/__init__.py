"""Feature dashboards of an SAE on facts-gpt (README.md has the command)."""
