"""Streaming rollouts of the world model: `worldsim.rollout.session.RolloutSession`.

Deliberately imports nothing: import the module you need (it pulls in torch and the model).
"""
