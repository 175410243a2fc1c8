"""vpanel's root side: guests as security contexts on a stock kernel.

Nothing below this package imports Django (tests/test_layout.py checks it).
"""
