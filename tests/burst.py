"""A burst of /predict requests from client threads, for the failover and shutdown tests: each
outcome is the status code, or the name of the transport error when no answer came."""
import io
import threading
import time
from typing import List, Union

import httpx
from PIL import Image

Outcome = Union[int, str]


def shaded_pngs() -> List[bytes]:
    """Eight small grey PNGs of different shades."""
    images = []
    for shade in range(40, 240, 25):
        buffer = io.BytesIO()
        Image.new("L", (28, 28), shade).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


class Burst:
    """``clients`` threads, each its own connection, each sending ``requests`` images one after another."""

    def __init__(self, url: str, clients: int, requests: int, images: List[bytes], timeout: float = 60):
        self.outcomes: List[Outcome] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(url, i, requests, images, timeout))
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, url: str, index: int, requests: int, images: List[bytes], timeout: float) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for i in range(requests):
                try:
                    outcome: Outcome = http.post("/predict", files=[("file", ("x", images[(index + i) % len(images)]))]
                                                 ).status_code
                except httpx.TransportError as error:
                    outcome = type(error).__name__
                with self._lock:
                    self.outcomes.append(outcome)

    def wait_for(self, answered: int, timeout: float = 60) -> None:
        """Until ``answered`` outcomes are in: the burst is under way."""
        until = time.monotonic() + timeout
        while len(self.outcomes) < answered:
            if time.monotonic() > until:
                raise TimeoutError(f"only {len(self.outcomes)} of {answered} requests answered")
            time.sleep(0.01)

    def join(self) -> List[Outcome]:
        for thread in self._threads:
            thread.join()
        return self.outcomes

    @staticmethod
    def tally(outcomes: List[Outcome]) -> dict:
        return {o: outcomes.count(o) for o in set(outcomes)}
