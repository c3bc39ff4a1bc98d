"""minidalle: DALL·E (Ramesh et al. 2021) rebuilt small enough to read, real enough to train."""

__version__ = "0.1.0"
