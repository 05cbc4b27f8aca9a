"""The real `greyd` command with one fault planted, for tests/test_guard.py.

Run as `python tests/faulty_greyd.py -c CONFIG start ...`: greyd as an
administrator starts it, except that the end of data of a message carrying
the header `X-Plant-Fault: yes` raises, as a bug there would. Nothing else
differs, so what the test sees (the client's reply, the log file, the
daemon going on) is what a real bug at that point would bring.
"""

import sys

from greyd import smtp
from greyd.cli import main

MARK = b"X-Plant-Fault: yes"


class PlantedFault(Exception):
    """The fault this script plants."""


_finish_data = smtp.Session.finish_data


def _faulty_finish_data(session, received):
    if MARK in received.data:
        raise PlantedFault("planted at the end of data")
    return _finish_data(session, received)


smtp.Session.finish_data = _faulty_finish_data

if __name__ == "__main__":
    sys.argv[0] = "greyd"
    main()
