"""RL for LoRA policies: KL estimators, advantages, policy/value objectives."""
