"""Placements: solving on demand (POST /v1/placements), publishing generations, the planner
loop and its leader lease.

Transaction boundaries:
- ``compute``: one read transaction for the planning input; the solver runs outside any
  transaction (a worker process); ``publish`` is one write transaction (retried when another
  process took the generation number first).
- ``tick`` (one planner round): the session sweep (app.service.sessions), one write
  transaction to take or renew the leader lease, one to read the re-plan request and the live
  state, then (on a re-plan) one to clear the request and one to publish.
- ``get``: one read transaction.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.allocation import cg
from app.allocation.instance import Instance, Span
from app.allocation.solve import Solution
from app.logging import get_logger
from app.service import planner
from app.service.audit import audit
from app.service.core import Core
from app.service.errors import Conflict, Invalid, NotFound, ServiceError, Unavailable
from app.service.routeview import model_cache_gb
from app.service.schemas import PlacedSpan, PlacementOut, PlacementRequest
from app.service.state import LiveState, build_scenario, load_state
from app.store import repositories as repo
from app.store.models import PlacementRow, ServerRow

log = get_logger("bprr.coordinator")


class PlacementService:
    def __init__(self, core: Core, sweep: Callable[[], int]) -> None:
        self.core = core
        self.settings = core.settings
        self._sweep = sweep  # the sessions' sweep, run at the start of every planner round
        # The solver worker is killed this long after its time limit (tests shorten it).
        self.solver_grace_s = planner.SOLVER_GRACE_S
        self._plan_lock = threading.Lock()

    # --- on demand ------------------------------------------------------------------------------

    def _planning_input(self, db: Session, now: float) -> tuple[LiveState, list[ServerRow]]:
        state = load_state(db)
        if state.model is None:
            raise Conflict("no model is set yet (PUT /v1/model)")
        live = plannable(state, now)
        if not live:
            raise Conflict(
                "no server with a live lease (and memory for one block and one cache) "
                "to place blocks on"
            )
        return state, live

    def _concurrency(
        self, state: LiveState, instance: Instance, scenario_rate: float | None
    ) -> int:
        model = state.model
        assert model is not None
        best = cg.max_feasible_concurrency(instance)
        if best < 1:
            raise Conflict(
                "the live servers cannot hold the model even for one request "
                f"({instance.num_blocks} blocks)"
            )
        if model.concurrency is not None:
            wanted = model.concurrency
        elif scenario_rate is not None:
            wanted = cg.design_concurrency(instance, scenario_rate)
        elif self.settings.default_concurrency > 0:
            wanted = self.settings.default_concurrency
        else:
            wanted = max(1, instance.num_clients)
        return max(1, min(wanted, best))

    def compute(self, request: PlacementRequest) -> PlacementOut:
        """POST /v1/placements: solve now (worker process) and publish as a new generation."""
        now = self.core.clock()
        with self.core.read_tx() as db:
            state, live = self._planning_input(db, now)
            scenario = build_scenario(state, live, self.settings.default_site_rtt_ms)
        instance = Instance.from_scenario(scenario)
        model = state.model
        assert model is not None
        if request.concurrency is not None:
            concurrency = request.concurrency
        else:
            concurrency = self._concurrency(state, instance, model.rate_per_s)
        limit = request.time_limit_s or self.settings.planner_time_limit_s
        solution = self._solve(scenario, request.algorithm, concurrency, limit)
        objective = planner.evaluate(
            instance, solution.placement, scenario.client_request_counts(concurrency)
        )
        spans = {
            instance.server_ids[j]: span
            for j, span in enumerate(solution.placement)
            if span is not None
        }
        return self.publish(
            solution,
            spans,
            objective if objective is not None else solution.objective_ms_per_token,
            scenario.model_dump(mode="json", exclude_none=True),
            "requested by the operator",
            solution.status,
        )

    def _solve(self, scenario: Any, algorithm: str, concurrency: int, limit: float) -> Solution:
        try:
            solution = planner.run_solver(
                scenario, algorithm, concurrency, limit, grace_s=self.solver_grace_s
            )
        except planner.SolverTimeout as error:
            raise Unavailable(str(error), retry_after_s=limit) from None
        except planner.SolverNoSolution as error:
            raise Invalid(f"time_limit_s: {error}") from None
        except planner.SolverError as error:
            raise Invalid(f"algorithm: {error}") from None
        self.core.counters.solver_seconds.append(solution.solve_seconds)
        return solution

    def publish(
        self,
        solution: Solution,
        spans: dict[str, Span],
        objective: float,
        inputs: dict[str, Any],
        reason: str,
        status: str,
    ) -> PlacementOut:
        now = self.core.clock()
        for _ in range(3):
            try:
                with self.core.tx() as db:
                    placements = repo.Placements(db)
                    row = PlacementRow(
                        generation=placements.latest_generation() + 1,
                        algorithm=solution.algorithm,
                        concurrency=solution.concurrency,
                        objective_ms_per_token=float(objective),
                        bound_ms_per_token=solution.bound_ms_per_token,
                        status=status,
                        solve_seconds=solution.solve_seconds,
                        reason=reason[:500],
                        created_at=now,
                        inputs=json.dumps(inputs),
                        spans=json.dumps({k: [v.start, v.end] for k, v in spans.items()}),
                    )
                    placements.add(row)
                    out = placement_out(row)
                break
            except IntegrityError:  # another process published the same generation first
                continue
        else:
            raise Conflict("another coordinator kept publishing placements; retry")
        self.core.counters.placements_published += 1
        self.core.invalidate()
        audit(
            "placement_published",
            generation=out.generation,
            algorithm=out.algorithm,
            reason=reason[:200],
        )
        log.info(
            "placement published",
            generation=out.generation,
            reason=reason,
            objective_ms_per_token=round(objective, 3),
        )
        return out

    def get(self, generation: int | None) -> PlacementOut:
        with self.core.read_tx() as db:
            placements = repo.Placements(db)
            if generation is None:
                row = placements.current()
                if row is None:
                    raise NotFound("no placement has been published yet")
            else:
                row = placements.get(generation)
                if row is None:
                    raise NotFound(f"generation: no placement with generation {generation}")
            return placement_out(row)

    # --- the planner (leader only) ------------------------------------------------------------

    def try_lead(self) -> bool:
        now = self.core.clock()
        expires = now + self.settings.leader_lease_s
        with self.core.tx() as db:
            return repo.Leader(db).acquire(self.core.instance_id, now, expires)

    def release_leadership(self) -> None:
        try:
            with self.core.tx() as db:
                repo.Leader(db).release(self.core.instance_id)
        except Exception:  # the database may already be gone at shutdown
            pass

    def loop(self) -> None:
        while not self.core.stop.wait(self.settings.planner_interval_s):
            try:
                self.tick()
            except ServiceError as error:
                log.info("planner skipped", reason=error.message)
            except Exception as error:
                log.error("planner failed", error=f"{type(error).__name__}: {error}")

    def tick(self) -> str:
        """One planner round: sweep sessions, then (leader only) re-plan if there is a reason.

        Returns what it did, for tests and logs."""
        self._sweep()
        if not self.try_lead():
            return "follower"
        with self._plan_lock:
            now = self.core.clock()
            with self.core.tx() as db:
                requested = repo.PlannerState(db).requested()
                state = load_state(db)
            if state.model is None:
                return "no model"
            live = plannable(state, now)
            if not live:
                return "no live servers"
            current = state.assigned_spans()
            lost = coverage_lost(state, live, current)
            reason = requested or ("coverage lost" if lost else None)
            scenario = build_scenario(state, live, self.settings.default_site_rtt_ms)
            instance = Instance.from_scenario(scenario)
            if reason is None and state.placement is not None:
                stored = state.placement.objective_ms_per_token
                counts = scenario.client_request_counts(state.placement.concurrency)
                aligned = planner.aligned_current(instance.server_ids, current)
                now_obj = planner.evaluate(instance, aligned, counts)
                if now_obj is None:
                    reason = "coverage lost"
                elif stored > 0 and abs(now_obj - stored) / stored > self.settings.replan_drift:
                    reason = f"measurements drifted ({stored:.1f} -> {now_obj:.1f} ms/token)"
            if reason is None:
                return "steady"
            return self._replan(state, scenario, instance, current, reason, now)

    def _replan(
        self,
        state: LiveState,
        scenario: Any,
        instance: Instance,
        current: dict[str, Span],
        reason: str,
        now: float,
    ) -> str:
        model = state.model
        assert model is not None
        try:
            concurrency = self._concurrency(state, instance, model.rate_per_s)
        except Conflict as error:
            with self.core.tx() as db:
                repo.PlannerState(db).clear(now)
            return f"cannot plan: {error.message}"
        algorithm = self.settings.planner_algorithm
        solution = self._solve(scenario, algorithm, concurrency, self.settings.planner_time_limit_s)
        counts = scenario.client_request_counts(concurrency)
        aligned = planner.aligned_current(instance.server_ids, current)
        decision = planner.plan_update(
            instance, solution, aligned, counts, self.settings.replan_min_gain
        )
        with self.core.tx() as db:
            repo.PlannerState(db).clear(now)
        if not decision.publish:
            log.info("re-plan kept the current placement", reason=reason, why=decision.reason)
            return f"kept ({decision.reason})"
        spans = {
            instance.server_ids[j]: span
            for j, span in enumerate(decision.placement)
            if span is not None
        }
        status = solution.status if decision.kept == 0 else "sticky"
        objective = decision.objective_ms_per_token or solution.objective_ms_per_token
        out = self.publish(
            solution,
            spans,
            objective,
            scenario.model_dump(mode="json", exclude_none=True),
            f"{reason}; {decision.reason}, {decision.moved} spans moved, {decision.kept} kept",
            status,
        )
        return f"published {out.generation}"


def plannable(state: LiveState, now: float) -> list[ServerRow]:
    """Servers the planner may use: live lease, not draining, room for one block + one cache."""
    model = state.model
    if model is None:
        return []
    one_block = model.block_memory_gb + model_cache_gb(model)
    return [
        s
        for s in state.servers
        if s.lease_expires_at > now and s.state != "draining" and s.memory_gb >= one_block
    ]


def coverage_lost(state: LiveState, live: list[ServerRow], current: dict[str, Span]) -> bool:
    model = state.model
    if model is None or not current:
        return True
    covered = [False] * model.num_blocks
    for server in live:
        span = current.get(server.id)
        if span is None:
            continue
        for block in range(span.start, min(span.end, model.num_blocks)):
            covered[block] = True
    return not all(covered)


def placement_out(row: PlacementRow) -> PlacementOut:
    spans: dict[str, list[int]] = json.loads(row.spans)
    return PlacementOut(
        generation=row.generation,
        algorithm=row.algorithm,
        concurrency=row.concurrency,
        objective_ms_per_token=row.objective_ms_per_token,
        bound_ms_per_token=row.bound_ms_per_token,
        status=row.status,
        solve_seconds=row.solve_seconds,
        reason=row.reason,
        created_at=row.created_at,
        spans=[PlacedSpan(server_id=k, start=v[0], end=v[1]) for k, v in spans.items()],
        inputs=json.loads(row.inputs),
    )
