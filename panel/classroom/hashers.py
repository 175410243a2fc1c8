"""A password hasher for passwords vpanel generates itself.

The slow default (PBKDF2 with hundreds of thousands of rounds) is there for
passwords people choose. A generated one (16 random letters and digits,
about 95 bits) cannot be guessed from its hash however fast the hash is, and
a class of 500 students would otherwise wait minutes on their hashing. So
generated passwords are stored with few rounds; the first time a student
logs in with one, Django re-hashes it with the default hasher, and any
password a student then picks gets the default from the start.
"""

from __future__ import annotations

from django.contrib.auth.hashers import PBKDF2PasswordHasher

__all__ = ["GeneratedPasswordHasher"]


class GeneratedPasswordHasher(PBKDF2PasswordHasher):
    algorithm = "pbkdf2_sha256_generated"
    iterations = 1000
