"""Local training and evaluation (no federated-learning knowledge)."""
