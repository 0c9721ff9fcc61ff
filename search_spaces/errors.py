"""The one exception family every layer raises for bad input or a failed job.

It lives in the lowest package so that search spaces, workers and the driver share it
without importing upwards. Messages carry the bad value, what is allowed and the setting
to change; the exception pickles with its message, so it crosses Ray actors intact.
"""


class UnasError(Exception):
    """Base class of the project's errors."""

    # The command line's exit status: 2 for bad input found before work starts.
    exit_status = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


class GenotypeError(UnasError, ValueError):
    """A genotype that does not fit its search space."""
