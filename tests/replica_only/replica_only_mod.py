"""A module shipped to replicas with Env(py_modules=[...]) only: the driver cannot import it."""


class Secret:
    def __init__(self, value):
        self.value = value


class SecretError(Exception):
    pass


def make(x):
    if x == 1:
        return Secret(x)
    if x == 3:
        raise SecretError(f"secret failure on {x}")
    return x
