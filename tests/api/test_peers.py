"""A server's PETALS identity (peer id, multiaddrs) goes from its registration to
GET /v1/servers and to every hop of routes and sessions."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.api.conftest import JOIN, admin, bearer
from tests.api.helpers import SMALL_MODEL, heartbeat, register, route_params, server_body

PEER = "12D3KooWPeer1111111111111111111111111111111111111"


def test_peer_ids_reach_servers_routes_and_sessions(client: TestClient) -> None:
    assert client.put("/v1/model", json=SMALL_MODEL, headers=admin()).status_code == 200
    tokens = {}
    for i in range(2):
        body = server_body(
            i,
            memory_gb=12.0,
            peer_id=f"{PEER}{i + 1}",
            multiaddrs=[f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{PEER}{i + 1}"],
        )
        tokens[f"s{i}"] = register(client, body)
    tokens["s2"] = register(client, server_body(2, memory_gb=12.0))  # none: still fine
    placed = client.post("/v1/placements", json={"algorithm": "cg"}, headers=admin()).json()
    for span in placed["spans"]:
        loaded = {"start": span["start"], "end": span["end"]}
        sid = span["server_id"]
        assert heartbeat(client, sid, tokens[sid], loaded).status_code == 200

    listed = {s["id"]: s for s in client.get("/v1/servers").json()}
    assert listed["s0"]["peer_id"] == f"{PEER}1"
    assert listed["s1"]["multiaddrs"] == [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}2"]
    assert listed["s2"]["peer_id"] is None and listed["s2"]["multiaddrs"] == []

    route = client.get("/v1/routes", params=route_params()).json()
    booked = client.post("/v1/sessions", json=route_params()).json()
    for hops in (route["hops"], booked["route"]["hops"]):
        assert hops
        for hop in hops:
            server = listed[hop["server_id"]]
            assert hop["peer_id"] == server["peer_id"]
            assert hop["multiaddrs"] == server["multiaddrs"]


def test_a_malformed_peer_id_or_multiaddr_is_a_422_naming_the_field(client: TestClient) -> None:
    for extra, field in (
        ({"peer_id": "not base58 0OIl"}, "peer_id"),
        ({"multiaddrs": ["ip4/no-leading-slash"]}, "multiaddrs"),
        ({"multiaddrs": ["/ip4/1.2.3.4"] * 17}, "multiaddrs"),
        ({"multiaddrs": "/ip4/1.2.3.4"}, "multiaddrs"),
    ):
        reply = client.post("/v1/servers", json=server_body(0, **extra), headers=bearer(JOIN))
        assert reply.status_code == 422, (extra, reply.text)
        assert field in str(reply.json()["detail"])
