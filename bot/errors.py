"""Domain errors. Every error a user may see carries a short message written for that user."""


class HnaasError(Exception):
    """Base class for errors with a user-facing message.

    `user_message` is what a member of the channel reads; `str(error)` may carry more detail for logs.
    """

    def __init__(self, user_message: str, detail: str | None = None) -> None:
        super().__init__(detail or user_message)
        self.user_message = user_message


class LinkError(HnaasError):
    """A link could not be used (bad scheme, private address, too large...)."""


class QueueFull(HnaasError):
    """The requester or the whole queue is at its cap."""


class JobNotFound(HnaasError):
    """No job with that id (or not one the caller may touch)."""


class ModelNotInstalled(HnaasError):
    """No checkpoint at the configured model path."""


class PostError(HnaasError):
    """A platform refused or failed a post.

    ``permanent`` errors (missing permission, deleted channel, 403/404) fail the job; others may be retried.
    """

    def __init__(self, user_message: str, detail: str | None = None, *, permanent: bool = False) -> None:
        super().__init__(user_message, detail)
        self.permanent = permanent


class InputRejected(HnaasError):
    """The request itself can't become a job (too long, empty...)."""


class PlatformRefused(HnaasError):
    """A platform would not let the bot connect (a bad token, a missing intent or setting): the operator's message
    says what to fix."""
