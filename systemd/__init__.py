"""The systemd unit template that `prefork systemd` renders, installed as ``prefork_units``."""
