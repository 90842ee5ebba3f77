"""The probes' palette: the colours of sign borders and markers, the marker shapes and the code alphabet.

Owned here once; the generator draws with it and the expert policy reads pixels against it. Nothing outside
``glimpse.probes`` imports it.
"""

CODE_ALPHABET = "ACEFHJKLMNPRTUVWXY34679"  # no look-alike pairs such as O/0, I/1, S/5, B/8
MARKER_COLORS = {
    "red": (215, 30, 30),
    "green": (20, 150, 50),
    "blue": (30, 70, 220),
    "orange": (245, 130, 0),
    "purple": (130, 40, 170),
    "black": (20, 20, 20),
}
MARKER_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "hexagon")
BORDER_COLORS = {
    "blue": (35, 85, 215),
    "red": (205, 35, 35),
    "green": (35, 150, 65),
    "orange": (240, 135, 15),
    "purple": (135, 55, 175),
    "teal": (0, 140, 145),
    "brown": (125, 75, 35),
    "pink": (225, 95, 165),
}

__all__ = ["BORDER_COLORS", "CODE_ALPHABET", "MARKER_COLORS", "MARKER_SHAPES"]
