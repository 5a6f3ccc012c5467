"""A fleet module whose import raises a BaseException of its own: a configuration error."""


class Unusual(BaseException):
    pass


fleet = {"w": print}
raise Unusual("the floor gave up")
