"""fcmoe: federated fine-tuning of Mixture-of-Experts language models with FC-MoE and its baselines."""

__version__ = "0.1.0"
