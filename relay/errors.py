"""Relay's own exceptions: each carries a one-line message a user can act on."""


class RelayError(Exception):
    """A failure with a message meant for the user; the CLI prints it as one line."""


class ConfigError(RelayError):
    """A configuration file, key or value is wrong; the message names the field."""
