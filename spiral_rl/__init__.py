"""spiral_rl: closed-loop (think - act - reflect) RL post-training for action world models.

The library holds no Ray code: `actors/` wraps these objects for Ray, `launch/` drives them.
"""

__version__ = "0.1.0"
