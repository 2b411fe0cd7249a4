"""One error type for everything a user can get wrong: it names the problem and the fix."""


class AbdomenSegError(Exception):
    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. {fix}" if fix else problem)


class DiskFull(AbdomenSegError):
    """No space left (or the quota used up) while writing: the run stops, since every later write would fail too."""


class Cancelled(Exception):
    """Raised inside long work when the caller's cancel hook says stop."""
