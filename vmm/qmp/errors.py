"""The error a QMP command answers with: QEMU's error classes, as StratoVirt uses them."""

CLASSES = ("GenericError", "CommandNotFound", "DeviceNotActive", "DeviceNotFound",
           "KVMMissingCap")


class QmpError(Exception):
    def __init__(self, error_class: str, desc: str):
        assert error_class in CLASSES, error_class
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def reply(self) -> dict:
        return {"error": {"class": self.error_class, "desc": self.desc}}
