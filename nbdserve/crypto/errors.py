"""The crypto layer's exceptions.

``CryptoError``: a header, parameter or cipher nbdserve cannot use; ``str()`` is one line naming
the field (the format driver prefixes the file name).  ``WrongKey``: the header is fine but no
keyslot accepts the key given.  Neither ever carries key material in its message.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Unusable encryption metadata or parameters; the message is one line."""


class UnsupportedCipher(CryptoError):
    """A valid cipher, mode, IV generator or hash that nbdserve does not implement."""


class WrongKey(CryptoError):
    """No keyslot opens with the given passphrase (or the legacy key does not fit)."""
