"""The base of every error that means "your input is wrong; here is the fix".

Each module raises its own subclass (bad model_args, a damaged lens, missing data...);
commands catch this base and print the message alone, without a traceback.
"""


class UserInputError(ValueError):
    """Input the user has to change; the message names the problem and the fix."""
