"""Helpers for the command lines built on the library."""

from absl import flags, logging


def quiet_orbax_logs() -> None:
    """Orbax logs every save and restore at absl INFO: show warnings only, unless the user asked
    for a level with --verbosity (--verbosity=0 shows them). Call after absl has parsed flags."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
