"""The exit codes of every ``glimpse`` command (the README's table), defined once."""

EXIT_OK = 0  # answered / done
EXIT_NO_ANSWER = 1  # finished without an answer: a cap was reached, or the model neither zoomed nor answered
EXIT_USAGE = 2  # bad usage or configuration
EXIT_INPUT = 3  # the image could not be read
EXIT_BACKEND = 4  # the model backend failed
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C)
