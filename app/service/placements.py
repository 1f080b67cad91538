"""Placements: solving on demand (POST /v1/placements), publishing generations, the planner
loop and its leader lease. The re-plan decisions (which servers to plan on, whether to
re-plan, what to publish) are app.allocation.replan's pure functions; this module feeds them
the live state and writes what they decide.

Transaction boundaries:
- ``compute``: one read transaction for the planning input; the solver runs outside any
  transaction (a worker process); ``publish`` is one write transaction (retried when another
  process took the generation number first). ``insert`` adds a plan's row inside a caller's
  transaction (the scenario load swaps the swarm and its placement in one).
- ``tick`` (one planner round): the session sweep (app.service.sessions), one write
  transaction to take or renew the leader lease, one to read the re-plan request and the live
  state, then (on a re-plan) one to clear the request and one to publish.
- ``get``: one read transaction.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.allocation import cg, replan
from app.allocation.instance import Instance, Placement, Span
from app.allocation.scenario import Scenario
from app.allocation.solve import Solution
from app.allocation.workload import WorkloadProfile
from app.logging import get_logger
from app.service import planner
from app.service.audit import audit
from app.service.core import Core
from app.service.errors import Conflict, Invalid, NotFound, ServiceError, Unavailable
from app.service.routeview import model_cache_gb
from app.service.schemas import PlacedSpan, PlacementOut, PlacementRequest
from app.service.state import LiveState, build_scenario, load_state
from app.store import repositories as repo
from app.store.models import ModelRow, PlacementRow, ServerRow

log = get_logger("bprr.coordinator")
Workload = Callable[[], dict[str, object] | None]


@dataclass(frozen=True)
class Plan:
    """A solved placement ready to publish."""

    solution: Solution
    spans: dict[str, Span]
    objective: float
    inputs: dict[str, Any]
    reason: str
    status: str
    chains: list[dict[str, Any]] | None  # JSON shape of PlacementRow.chains
    dispatcher: str


def no_workload() -> dict[str, object] | None:
    return None


class PlacementService:
    def __init__(
        self, core: Core, sweep: Callable[[], int], workload: Workload = no_workload
    ) -> None:
        self.core = core
        self.settings = core.settings
        self._sweep = sweep  # the sessions' sweep, run at the start of every planner round
        # The measured load (sessions' profile as a scenario workload), planned for.
        self._workload = workload
        # The solver worker is killed this long after its time limit (tests shorten it).
        self.solver_grace_s = planner.SOLVER_GRACE_S
        self._plan_lock = threading.Lock()
        self._considered: tuple[int, frozenset[str]] = (0, frozenset())

    # --- on demand ------------------------------------------------------------------------------

    def _planning_input(
        self, db: Session, now: float
    ) -> tuple[LiveState, list[ServerRow], Scenario]:
        state = load_state(db)
        if state.model is None:
            raise Conflict("no model is set yet (PUT /v1/model)")
        live = plannable(state, now)
        if not live:
            raise Conflict(
                "no server with a live lease (and memory for one block and one cache) "
                "to place blocks on"
            )
        scenario = build_scenario(
            state, live, self.settings.default_site_rtt_ms, workload=self._workload()
        )
        return state, live, scenario

    def concurrency(
        self, model_concurrency: int | None, instance: Instance, rate: float | None
    ) -> int:
        """|R| to solve for (replan.planner_concurrency); Conflict when not one request fits."""
        try:
            return replan.planner_concurrency(
                cg.max_feasible_concurrency(instance),
                model_concurrency,
                None if rate is None else (lambda: cg.design_concurrency(instance, rate)),
                self.settings.default_concurrency,
                instance.num_clients,
            )
        except ValueError:
            raise Conflict(
                "the live servers cannot hold the model even for one request "
                f"({instance.num_blocks} blocks)"
            ) from None
        except ArithmeticError:  # OverflowError: measurements too extreme to plan with
            raise Conflict(
                "rate_per_s: the design concurrency for this rate overflows; set the model's "
                "concurrency or a smaller rate"
            ) from None

    def compute(self, request: PlacementRequest) -> PlacementOut:
        """POST /v1/placements: solve now (worker process) and publish as a new generation."""
        now = self.core.clock()
        with self.core.read_tx() as db:
            state, _, scenario = self._planning_input(db, now)
        model = state.model
        assert model is not None
        plan = self.plan(
            scenario,
            request.algorithm,
            request.concurrency,
            model,
            request.time_limit_s or self.settings.planner_time_limit_s,
            "requested by the operator",
        )
        return self.publish(plan)

    def plan(
        self,
        scenario: Scenario,
        algorithm: str,
        concurrency: int | None,
        model: ModelRow | None,
        limit: float,
        reason: str,
    ) -> Plan:
        """Solve ``scenario`` (no database access)."""
        try:
            instance = Instance.from_scenario(scenario)
        except (ValueError, ArithmeticError) as error:
            raise Invalid(f"scenario: the planner cannot use these numbers ({error})") from None
        if concurrency is None:
            # The measured (or, before any booking, the declared) load the scenario carries.
            rate = getattr(scenario.workload, "rate_per_s", None)
            rate = rate or (model.rate_per_s if model is not None else None)
            concurrency = self.concurrency(
                None if model is None else model.concurrency, instance, rate
            )
        solution = self._solve(scenario, algorithm, concurrency, limit)
        objective = replan.evaluate(
            instance, solution.placement, scenario.client_request_counts(concurrency)
        )
        return Plan(
            solution=solution,
            spans=replan.spans_by_id(instance.server_ids, solution.placement),
            objective=objective if objective is not None else solution.objective_ms_per_token,
            inputs=scenario.model_dump(mode="json", exclude_none=True),
            reason=reason,
            status=solution.status,
            chains=chains_json_of(solution.chains, instance.server_ids, client_sites(scenario)),
            dispatcher=solution.dispatcher,
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

    def insert(self, db: Session, plan: Plan, now: float) -> PlacementRow:
        """Add the plan as the next generation in the caller's transaction."""
        placements = repo.Placements(db)
        solution = plan.solution
        row = PlacementRow(
            generation=placements.latest_generation() + 1,
            algorithm=solution.algorithm,
            concurrency=solution.concurrency,
            objective_ms_per_token=float(plan.objective),
            bound_ms_per_token=solution.bound_ms_per_token,
            status=plan.status,
            solve_seconds=solution.solve_seconds,
            reason=plan.reason[:500],
            created_at=now,
            inputs=json.dumps(plan.inputs),
            spans=json.dumps({k: [v.start, v.end] for k, v in plan.spans.items()}),
            chains=None if plan.chains is None else json.dumps(plan.chains),
            dispatcher=plan.dispatcher,
        )
        placements.add(row)
        return row

    def published(self, out: PlacementOut) -> None:
        """After the commit of a new generation: counters, the view, the logs."""
        self.core.counters.placements_published += 1
        self.core.invalidate()
        audit(
            "placement_published",
            generation=out.generation,
            algorithm=out.algorithm,
            reason=out.reason[:200],
        )
        log.info(
            "placement published",
            generation=out.generation,
            reason=out.reason,
            objective_ms_per_token=round(out.objective_ms_per_token, 3),
        )

    def publish(self, plan: Plan) -> PlacementOut:
        now = self.core.clock()
        for _ in range(3):
            try:
                with self.core.tx() as db:
                    out = placement_out(self.insert(db, plan, now))
                break
            except IntegrityError:  # another process published the same generation first
                continue
        else:
            raise Conflict("another coordinator kept publishing placements; retry")
        self.published(out)
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
            model = state.model
            if model is None:
                return "no model"
            live = plannable(state, now)
            if not live:
                return "no live servers"
            current = state.assigned_spans()
            lost = replan.coverage_lost(model.num_blocks, map(_server_state, live), current)
            scenario = build_scenario(
                state, live, self.settings.default_site_rtt_ms, workload=self._workload()
            )
            instance = Instance.from_scenario(scenario)
            aligned = planner.aligned_current(instance.server_ids, current)
            placement = state.placement

            def current_objective() -> float | None:
                assert placement is not None
                counts = scenario.client_request_counts(placement.concurrency)
                return replan.evaluate(instance, aligned, counts)

            reason = replan.replan_reason(
                requested,
                lost,
                None if placement is None else placement.objective_ms_per_token,
                current_objective,
                self.settings.replan_drift,
            )
            if reason is None and placement is not None and self._unplanned(placement, live):
                reason = "servers the published plan did not consider"
            if reason is None:
                return "steady"
            return self._replan(model, scenario, instance, aligned, reason, now)

    def _unplanned(self, placement: PlacementRow, live: list[ServerRow]) -> bool:
        """Some live server joined (or came back) after the published plan was made: the
        plan's inputs do not list it. A server the plan considered and left idle is not."""
        generation, considered = self._considered
        if generation != placement.generation:
            try:
                inputs = json.loads(placement.inputs)
                ids = frozenset(str(s.get("id")) for s in inputs.get("servers", []))
            except (ValueError, AttributeError, TypeError):
                ids = frozenset()
            self._considered = generation, considered = placement.generation, ids
        return any(server.id not in considered for server in live)

    def _replan(
        self,
        model: ModelRow,
        scenario: Scenario,
        instance: Instance,
        current: Placement,
        reason: str,
        now: float,
    ) -> str:
        try:
            plan = self.plan(
                scenario,
                self.settings.planner_algorithm,
                None,
                model,
                self.settings.planner_time_limit_s,
                reason,
            )
        except Conflict as error:
            with self.core.tx() as db:
                repo.PlannerState(db).clear(now)
            return f"cannot plan: {error.message}"
        solution = plan.solution
        profile = WorkloadProfile.from_scenario(scenario)
        counts = scenario.client_request_counts(solution.concurrency)
        decision = replan.plan_update(
            instance, solution, current, counts, self.settings.replan_min_gain, profile
        )
        with self.core.tx() as db:
            repo.PlannerState(db).clear(now)
        chosen = decision.placement
        why = decision.reason
        if not decision.publish:
            # Servers that joined or came back get the fresh plan's span even when the rest
            # of the placement is kept: adding a server only adds routes.
            added = _with_new_servers(current, solution.placement)
            if added is None:
                log.info("re-plan kept the current placement", reason=reason, why=why)
                return f"kept ({why})"
            chosen, why = added, f"{why}; spans for servers without one"
        chains = plan.chains
        objective = decision.objective_ms_per_token or plan.objective
        if chosen != solution.placement and solution.chains:
            from app.allocation.chains import chains_for_placement

            fresh_chains, _ = chains_for_placement(instance, profile, chosen)
            chains = chains_json_of(fresh_chains, instance.server_ids, client_sites(scenario))
        if chosen != solution.placement and not solution.chains:
            evaluated = replan.evaluate(instance, chosen, counts)
            objective = evaluated if evaluated is not None else objective
        status = solution.status if chosen == solution.placement else "sticky"
        out = self.publish(
            Plan(
                solution=solution,
                spans=replan.spans_by_id(instance.server_ids, chosen),
                objective=objective,
                inputs=plan.inputs,
                reason=f"{reason}; {why}, {decision.moved} spans moved, {decision.kept} kept",
                status=status,
                chains=chains,
                dispatcher=plan.dispatcher,
            )
        )
        return f"published {out.generation}"


def _server_state(row: ServerRow) -> replan.ServerState:
    return replan.ServerState(row.id, row.memory_gb, row.lease_expires_at, row.state)


def plannable(state: LiveState, now: float) -> list[ServerRow]:
    """The live servers the planner may use (replan.plannable), as rows."""
    model = state.model
    if model is None:
        return []
    keep = {
        s.id
        for s in replan.plannable(
            map(_server_state, state.servers), now, model.block_memory_gb, model_cache_gb(model)
        )
    }
    return [row for row in state.servers if row.id in keep]


def _with_new_servers(current: Placement, fresh: Placement) -> Placement | None:
    """``current`` plus the fresh spans of servers that hold none; None when none gains one."""
    if not any(s is not None for s in current):
        return None
    added = [old if old is not None else new for old, new in zip(current, fresh, strict=True)]
    result: Placement = tuple(added)
    return None if result == current else result


def chains_json_of(
    chains: Any, server_ids: tuple[str, ...], client_sites: tuple[str, ...]
) -> list[dict[str, Any]] | None:
    """A chain plan's chains with server ids and per-site service times (PlacementRow.chains,
    read back by the route view); None for other plans."""
    if not chains:
        return None
    return [chain.to_json(server_ids, client_sites) for chain in chains]


def client_sites(scenario: Scenario) -> tuple[str, ...]:
    return tuple(client.site for client in scenario.clients)


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
