"""Ray actors: thin wrappers that build `spiral_rl` objects from config and expose a few methods.

Data flows one way, launch -> actors -> spiral_rl; the library never imports this package.
The rollout, critic, replay and learner actors land with the distributed driver (launch/grpo.py).
"""
