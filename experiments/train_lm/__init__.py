"""Language-model training on the facts world for any registered port (see README.md)."""
