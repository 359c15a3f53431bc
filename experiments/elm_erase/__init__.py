"""ELM concept erasure on the facts-world models, against gradient ascent and RMU."""
