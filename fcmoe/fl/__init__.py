"""The Flower engine: a ServerApp and a ClientApp that run :mod:`fcmoe.rounds` over Flower's messages."""

import time

IMPORTED_AT = time.time()  # the ClientApp's phase record: process start before this, imports after it
