"""The keyboard viewer behind `worldsim play`: drive a world model's dream with the keys.

Modules (each imported on its own; this package imports nothing, so importing it stays free of
pygame and torch):
    keymap      held keys -> a discrete action (Memory Maze arrows/WASD, number keys otherwise),
                and the viewer's control keys
    policies    the agent side of the human/agent toggle: a random walk, or a saved SB3 model
    real_side   the real Memory Maze stepped with the dream's actions, shown side by side
    recorder    the screen's frames to an mp4 or a gif
    app         `Viewer`: the pygame loop (events -> update -> draw) tying them together
"""
