"""A pytest plugin (``-p tests._nopeers``) that makes the peers unimportable, as on a machine
without them: used by test_no_peers.py to run the peer-free checks in a subprocess."""
import sys

BLOCKED = ("torch", "bitsandbytes", "peft", "transformers")


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (the peers are blocked)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
