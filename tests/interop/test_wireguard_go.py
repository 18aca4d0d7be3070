"""WARP's sans-I/O WireGuard core against Debian's wireguard-go, without a TUN on our side.

Our side is ``tests/interop/driver.py`` (a `warp.wireguard.Device` on a UDP socket, hand-built
ICMP echo packets) in namespace A; wireguard-go runs in namespace B with a real TUN, so B's
kernel answers our echo requests and sends its own. See docs/interop.md.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.interop.conftest import ServingDriver, run_driver, run_pinger, start_pair
from tests.interop.wglab import TUNNEL6_A, TUNNEL6_B, TUNNEL_A, TUNNEL_B, WgLab, b64

pytestmark = pytest.mark.interop

MTU = 1420


def assert_clean(result: dict[str, Any]) -> None:
    """Nothing from wireguard-go was rejected, and every message had WireGuard's size."""
    assert result["rejected"] == {}, result["rejected"]
    stats = result["stats"]
    assert stats["wire_size_mismatch_sent"] == 0, stats
    assert stats["wire_size_mismatch_received"] == 0, stats
    assert stats["send_errors"] == 0 and stats["unsent_no_endpoint"] == 0, stats


def assert_no_loss(run: dict[str, Any], sent: int) -> None:
    assert run["sent"] == sent, run
    assert run["lost"] == 0, run
    assert run["bad"] == 0, run


@pytest.mark.parametrize("underlay6", [False, True], ids=["udp4", "udp6"])
def test_we_initiate_then_ping_every_size(wglab: WgLab, underlay6: bool) -> None:
    """Our initiation (wireguard-go learns our endpoint from it), then one echo request per IP
    packet size 28..1420 (IPv4) and 48..1420 (IPv6) inside the tunnel, each answered by B's
    kernel and checked byte for byte."""
    pair = start_pair(wglab, far_knows_endpoint=False, underlay6=underlay6)
    result = run_driver(
        pair,
        [
            "ping",
            *("--src", TUNNEL_A, "--dst", TUNNEL_B),
            *("--src", TUNNEL6_A, "--dst", TUNNEL6_B),
            "--sizes",
            f"28-{MTU}" if not underlay6 else "28-100,1000-1420",
        ],
    )
    assert result["handshake_s"] is not None, result
    assert [h["initiator"] for h in result["handshakes"]] == [True], result["handshakes"]
    v4 = result[f"sweep {TUNNEL_B}"]
    v6 = result[f"sweep {TUNNEL6_B}"]
    if underlay6:
        assert_no_loss(v4, 73 + 421)
        assert_no_loss(v6, 53 + 421)
    else:
        assert_no_loss(v4, MTU - 28 + 1)
        assert_no_loss(v6, MTU - 48 + 1)
    assert_clean(result)
    assert pair.log_count("Received handshake initiation") == 1
    assert pair.log_count("Sending handshake response") == 1


def test_1000_pings_with_forced_and_timer_rekeys(wglab: WgLab) -> None:
    """1000 pings, 8 in flight, no loss, across two rekeys while they are in flight: one forced
    (``initiate_handshake(force=True)``) and one by the REKEY_AFTER_TIME rule (our clock jumps
    121 s ahead, so the next send starts a handshake while the old session keeps working)."""
    pair = start_pair(wglab, far_knows_endpoint=False)
    result = run_driver(
        pair,
        [
            "ping",
            *("--src", TUNNEL_A, "--dst", TUNNEL_B),
            *("--count", "1000", "--window", "8", "--count-size", "1000"),
            *("--rekey-at", "300", "--clock-jump-at", "700:121"),
        ],
    )
    assert_no_loss(result["count"], 1000)
    handshakes = result["handshakes"]
    assert [h["initiator"] for h in handshakes] == [True, True, True], handshakes
    assert len({h["index"] for h in handshakes}) == 3, "each rekey made a new session"
    assert_clean(result)
    assert pair.log_count("Received handshake initiation") == 3


def test_they_initiate_then_ping_every_size_and_1000(wglab: WgLab) -> None:
    """wireguard-go initiates (a ping from B to our tunnel address); we answer every size both
    families, then 1000 pings with no loss, and during them we rekey as initiator ourselves."""
    pair = start_pair(wglab, far_knows_endpoint=True)
    driver = ServingDriver(pair, ["--rekey-after", f"{3 + (MTU - 27) + (MTU - 47) + 500}"])
    try:
        first = wglab.exec("b", ["ping", "-c", "3", "-i", "0.2", "-W", "5", TUNNEL_A], timeout=30)
        assert " 0% packet loss" in first.stdout, first.stdout
        v4 = run_pinger(wglab, TUNNEL_A, ["--sizes", f"28-{MTU}"])
        v6 = run_pinger(wglab, TUNNEL6_A, ["--sizes", f"48-{MTU}"])
        counted = run_pinger(wglab, TUNNEL_A, ["--count", "1000", "--window", "8"])
    finally:
        result = driver.stop()
    assert_no_loss(v4, MTU - 28 + 1)
    assert_no_loss(v6, MTU - 48 + 1)
    assert_no_loss(counted, 1000)
    handshakes = result["handshakes"]
    assert [h["initiator"] for h in handshakes] == [False, True], handshakes
    assert result["stats"]["echo_requests_answered"] == 3 + (MTU - 27) + (MTU - 47) + 1000
    assert_clean(result)
    assert pair.log_count("Sending handshake initiation") == 1
    assert pair.log_count("Received handshake response") == 1
    assert pair.log_count("Received handshake initiation") == 1


def test_they_rekey_while_we_hold_a_session(wglab: WgLab) -> None:
    """wireguard-go forgets us and comes back (peer removed and re-added: it must handshake
    again, as initiator) while our side still holds the old session: we answer as responder,
    the new session replaces the old one, and pings flow again."""
    pair = start_pair(wglab, far_knows_endpoint=True)
    driver = ServingDriver(pair, [])
    try:
        before = run_pinger(wglab, TUNNEL_A, ["--count", "20"])
        wglab.exec("b", ["wg", "set", pair.far.ifname, "peer", b64(pair.ours.public), "remove"])
        key = wglab.write_key("psk-again", pair.psk)
        wglab.exec(
            "b",
            [
                *("wg", "set", pair.far.ifname, "peer", b64(pair.ours.public)),
                *("preshared-key", str(key), "endpoint", f"192.168.77.1:{51820}"),
                *("allowed-ips", f"{TUNNEL_A}/32,{TUNNEL6_A}/128"),
            ],
        )
        after = run_pinger(wglab, TUNNEL_A, ["--count", "200", "--window", "4"])
    finally:
        result = driver.stop()
    assert_no_loss(before, 20)
    assert_no_loss(after, 200)
    handshakes = result["handshakes"]
    assert [h["initiator"] for h in handshakes] == [False, False], handshakes
    assert handshakes[0]["index"] != handshakes[1]["index"]
    assert_clean(result)
    assert pair.log_count("Sending handshake initiation") == 2


def test_cookie_under_load(wglab: WgLab) -> None:
    """Our side as responder under load: wireguard-go's first initiation gets a cookie reply
    (no response); its retry REKEY_TIMEOUT later carries a valid mac2 and is accepted."""
    pair = start_pair(wglab, far_knows_endpoint=True)
    driver = ServingDriver(pair, ["--under-load"])
    try:
        ping = run_pinger(wglab, TUNNEL_A, ["--count", "3", "--first-timeout", "15"])
    finally:
        result = driver.stop()
    assert_no_loss(ping, 3)
    assert ping["first_rtt_ms"] >= 4500, "the first ping waited for wireguard-go's retry"
    counters = result["counters"]
    assert counters.get("cookie_replies_sent") == 1, counters
    assert counters.get("handshakes_completed") == 1, counters
    assert [h["initiator"] for h in result["handshakes"]] == [False]
    assert_clean(result)
    log = pair.far.log()
    assert log.count("Receiving cookie response from") == 1, log[-3000:]
    assert "Could not decrypt invalid cookie response" not in log
    assert "retrying (try 2)" in log
    assert log.count("Sending handshake initiation") == 2
    assert log.count("Received handshake response") == 1


def test_wrong_preshared_key_gives_no_session(wglab: WgLab) -> None:
    """The harness can fail: with a preshared key wireguard-go does not have, its response
    does not authenticate, no session starts and no ping is sent."""
    pair = start_pair(wglab, far_knows_endpoint=False)
    pair.psk = bytes(32)
    result = run_driver(
        pair,
        ["ping", "--src", TUNNEL_A, "--dst", TUNNEL_B, "--count", "1", "--handshake-timeout", "1"],
    )
    assert result["handshake_s"] is None
    assert result["handshakes"] == []
    assert result["rejected"].get("decrypt_failed", 0) >= 1, result["rejected"]
    assert pair.log_count("Sending handshake response") >= 1


def test_cookie_from_wireguard_go_under_load(wglab: WgLab) -> None:
    """Our side as initiator while wireguard-go is under load (kept there by bursts of
    garbage initiations with a valid mac1 from another socket): our first initiation gets a
    cookie reply, which we decrypt with our last mac1; our retry REKEY_TIMEOUT later carries
    a mac2 that wireguard-go accepts while still under load (it goes on answering the garbage
    with cookies before and after), so exactly one cookie and one handshake."""
    pair = start_pair(wglab, far_knows_endpoint=False)
    result = run_driver(
        pair,
        [
            *("ping", "--src", TUNNEL_A, "--dst", TUNNEL_B, "--count", "20"),
            *("--flood", pair.theirs.public.hex(), "--handshake-timeout", "20"),
        ],
    )
    assert result["handshake_s"] is not None and result["handshake_s"] >= 4.9, result
    counters = result["counters"]
    assert counters.get("cookie_replies_received") == 1, counters
    assert counters.get("initiations_sent") == 2, counters
    flood = result["flood"]
    assert flood["cookie_replies_in_the_second_before"] > 0, flood
    assert flood["cookie_replies_after_handshake"] > 0, flood
    assert_no_loss(result["count"], 20)
    assert_clean(result)
    assert pair.log_count("Received handshake initiation") == 1
    assert pair.log_count("Sending handshake response") == 1


def test_session_expired_by_our_clock_then_new_handshake(wglab: WgLab) -> None:
    """Our clock jumps past REJECT_AFTER_TIME (181 s) mid-stream: the session may no longer
    send, so the next pings are staged, a new handshake runs, and they all get through."""
    pair = start_pair(wglab, far_knows_endpoint=False)
    result = run_driver(
        pair,
        [
            *("ping", "--src", TUNNEL_A, "--dst", TUNNEL_B, "--count", "200"),
            *("--clock-jump-at", "100:181"),
        ],
    )
    assert_no_loss(result["count"], 200)
    assert [h["initiator"] for h in result["handshakes"]] == [True, True], result["handshakes"]
    assert_clean(result)
    assert pair.log_count("Received handshake initiation") == 2


def test_they_roam_to_a_new_port(wglab: WgLab) -> None:
    """wireguard-go moves to another UDP port mid-stream (``wg set … listen-port``): we learn
    its new endpoint from its next authenticated packet and answer there."""
    pair = start_pair(wglab, far_knows_endpoint=True)
    driver = ServingDriver(pair, [])
    try:
        before = run_pinger(wglab, TUNNEL_A, ["--count", "50"])
        wglab.exec("b", ["wg", "set", pair.far.ifname, "listen-port", "51999"])
        after = run_pinger(wglab, TUNNEL_A, ["--count", "200", "--window", "4"])
    finally:
        result = driver.stop()
    assert_no_loss(before, 50)
    assert_no_loss(after, 200)
    assert result["endpoint"] == ["192.168.77.2", 51999], result["endpoint"]
    assert [h["initiator"] for h in result["handshakes"]] == [False], result["handshakes"]
    assert_clean(result)
