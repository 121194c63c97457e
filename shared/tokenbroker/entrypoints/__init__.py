"""What the deployable functions call: one service per function, built once per instance."""
