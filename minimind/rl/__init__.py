"""Reinforcement learning from rewards: the reward functions (`rewards.py`) the RL stages share."""
