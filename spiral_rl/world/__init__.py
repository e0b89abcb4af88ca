"""The built-in world: procedural scenes of coloured shapes with exact ground truth."""
