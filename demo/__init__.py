"""The walk-through a newcomer runs first: ``make demo`` or ``python -m demo`` from the top of
the checkout (see :mod:`demo.__main__`). Built on :mod:`testbed`; not installed."""
