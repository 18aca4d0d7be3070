"""The map's return-routability rules (AddressValidator), sans-I/O with virtual time."""

from __future__ import annotations

from warp_map_server.validation import MAX_CREDITED, MAX_VALIDATED, AddressValidator

K = b"K" * 32
OTHER = b"O" * 32
REAL = ("198.51.100.7", 4000)
BYSTANDER = ("203.0.113.9", 53)


def validator() -> AddressValidator:
    return AddressValidator(bytes(range(32)), epoch_seconds=30.0)


def test_only_the_address_a_challenge_was_sent_to_can_echo_it() -> None:
    v = validator()
    token = v.challenge(K, BYSTANDER, 10.0)
    assert token is not None
    # the attacker never sees the bystander's challenge; its own address's does not fit
    own = v.challenge(K, REAL, 10.0)
    assert own is not None
    assert not v.confirm(K, BYSTANDER, own, 10.0)
    assert not v.confirm(OTHER, BYSTANDER, token, 10.0)  # nor for another client
    assert not v.is_validated(K, BYSTANDER)
    assert v.confirm(K, REAL, own, 11.0)
    assert v.is_validated(K, REAL)
    assert v.challenge(K, REAL, 12.0) is None  # validated: no more challenges
    assert v.counters["validation.challenge_failed"] == 2


def test_a_challenge_is_good_for_one_to_two_epochs() -> None:
    v = validator()
    token = v.challenge(K, REAL, 29.0)
    assert token is not None
    assert not v.confirm(K, REAL, token, 60.0)  # two epochs later
    assert v.confirm(K, REAL, token, 59.0)  # the next epoch


def test_an_unvalidated_address_gets_challenges_within_its_credit_and_nothing_else() -> None:
    v = validator()
    v.received(K, BYSTANDER, 112)
    assert not v.may_send(K, BYSTANDER, 96, challenge=False)  # push, relay, lookup answer
    assert v.may_send(K, BYSTANDER, 96, challenge=True)
    assert not v.may_send(K, BYSTANDER, 32, challenge=True)  # 16 bytes of credit left
    assert v.may_send(K, BYSTANDER, 16, challenge=True)
    assert not v.may_send(OTHER, BYSTANDER, 16, challenge=True)  # credit is per client
    assert v.counters["validation.unvalidated_dropped"] == 1
    assert v.counters["validation.over_credit"] == 2


def test_the_handshake_validates_where_its_response_went_once_confirmed() -> None:
    v = validator()
    v.responded(K, BYSTANDER)  # an initiation forged from the bystander…
    v.responded(K, REAL)  # …replaced by the one whose keys are confirmed
    assert not v.is_validated(K, REAL)
    v.handshake_confirmed(K)
    assert v.is_validated(K, REAL)
    assert not v.is_validated(K, BYSTANDER)
    assert v.may_send(K, REAL, 9000, challenge=False)


def test_what_a_session_proved_goes_with_it_and_memory_stays_bounded() -> None:
    v = validator()
    v.responded(K, REAL)
    v.handshake_confirmed(K)
    v.forget(K)
    assert not v.is_validated(K, REAL)
    for port in range(1, 1001):
        address = ("203.0.113.1", port)
        v.received(K, address, 100)
        token = v.challenge(K, address, 0.0)
        assert token is not None
        if port % 2:
            v.confirm(K, address, token, 0.0)
    assert len(v) <= MAX_VALIDATED + MAX_CREDITED
    assert v.is_validated(K, ("203.0.113.1", 999))  # the most recent ones are kept
