"""The request limits a server enforces and announces (GetInfo's `limits`, the Tinker front's
capabilities): one typed object, built once from the configuration."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RequestLimits:
    """Field for field cispo.v1.Limits (its comments say what each bounds)."""

    max_message_bytes: int
    max_tokens_per_request: int
    max_sequence_length: int
    idempotency_keys_remembered: int
    max_data_per_request: int
    max_sample_tokens: int
    max_num_samples: int
    max_sample_request_tokens: int

    def as_dict(self) -> dict[str, int]:
        """The fields by name (cispo.v1.Limits(**limits.as_dict()))."""
        return asdict(self)
