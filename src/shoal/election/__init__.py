"""Who orders the log: pure ranking rules (rules.py) and the actor that applies them."""
