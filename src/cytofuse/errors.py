"""Errors raised at the boundary: each names the file, the argument and the value."""


class CytofuseError(Exception):
    """Base class of the errors cytofuse raises on bad input."""


class InputError(CytofuseError, ValueError):
    """An input file, argument or configuration value cannot be used."""


class DataSetError(InputError):
    """An image set (folder or manifest) fails validation."""


class ConfigError(InputError):
    """A configuration file or field is invalid."""


class RunFolderError(CytofuseError, FileExistsError):
    """A run folder exists and would be overwritten, or lacks a stage."""
