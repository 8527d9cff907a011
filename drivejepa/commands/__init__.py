"""The verbs of the ``drivejepa`` command, one light module each, and what they parse alike."""
from __future__ import annotations


def parse_image_size(text: str, flag: str = "--image-size", minimum: int = 1, maximum: int = 8192) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (width, height); anything else, or a side outside [minimum, maximum], is a UserError
    naming ``flag``."""
    from drivejepa.errors import UserError

    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"{flag} {text}: expected WIDTHxHEIGHT, for example 800x450") from None
    if not (minimum <= w <= maximum and minimum <= h <= maximum):
        raise UserError(f"{flag} {text}: width and height must be between {minimum} and {maximum} pixels")
    return w, h
