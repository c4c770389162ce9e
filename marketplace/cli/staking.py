"""`strata provider` on chain: stake, unstake, withdraw, status and claim; and what every provider command
shares: its settings, its options and its connection to the chain and the gateway.

A provider bonds tokens in StakeManager to be matched; `unstake` moves stake into unbonding (still slashable),
and `withdraw` pays it out once the unbonding period has passed. Earnings are claimed from PayoutDistributor
with the Merkle proof the gateway serves at ``GET /v1/payouts/{address}``.

Every command prints JSON with ``--json`` (amounts as decimal strings of base units, times as unix seconds) and
exits 0 when done, 1 when refused or failed (with a stable code: ``{"error": {"code", "message"}}``), 2 on bad
arguments. Refusals the chain would make are checked before anything is sent; a revert that slips past them
(another transaction landed first) is reported under the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from eth_account.signers.local import LocalAccount
from rich.table import Table
from web3.types import TxReceipt

from marketplace.cli.common import (
    console,
    emit_json,
    errors,
    fail,
    parse_address,
    parse_amount,
    parse_http_url,
    parse_rpc_url,
    reported,
    tokens,
)
from marketplace.cli.keys import KeyFileOption, KeystoreOption, load_account, missing_key_message
from marketplace.provider.settings import ProviderSettings
from marketplace.provider.staking import bond
from settlement.chain import Chain
from settlement.deploy import Contracts, Deployment

app = typer.Typer()

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"

# The contracts' custom errors, by the codes the commands report them under.
REVERTS = {
    "StakeBelowMinimum": "stake_below_minimum",
    "UnstakeExceedsStake": "unstake_exceeds_stake",
    "UnbondingNotFinished": "unbonding_not_finished",
    "NothingToWithdraw": "nothing_to_withdraw",
    "ERC20InsufficientBalance": "insufficient_balance",
    "NothingToClaim": "nothing_to_claim",
    "StaleRoot": "stale_root",
    "InvalidProof": "invalid_proof",
}


RpcOption = Annotated[str | None, typer.Option("--rpc", help="JSON-RPC URL [default: RPC_URL]")]
DeploymentOption = Annotated[
    Path | None, typer.Option("--deployment", help="deployment file [default: DEPLOYMENT_FILE]")
]
GatewayOption = Annotated[
    str | None,
    typer.Option("--gateway", help=f"gateway URL [default: GATEWAY_URL, then {DEFAULT_GATEWAY_URL}]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


class ProviderSession:
    """The key, the deployed contracts and the gateway a provider command works with.

    Every argument is checked (usage errors, exit 2) before a missing key (when ``need_key``) is reported and
    before the chain is read."""

    def __init__(
        self,
        *,
        key_file: Path | None,
        keystore: Path | None,
        rpc: str | None,
        deployment: Path | None,
        gateway: str | None,
        as_json: bool,
        need_key: bool = True,
    ) -> None:
        self.settings = ProviderSettings()
        self.as_json = as_json
        self.account: LocalAccount | None = load_account(
            key_file=key_file,
            keystore=keystore,
            env_key=self.settings.provider_key,
            env_name="PROVIDER_KEY",
            as_json=as_json,
        )
        self.gateway_url = parse_http_url(gateway or self.settings.gateway_url or DEFAULT_GATEWAY_URL)
        rpc_url = parse_rpc_url(rpc or self.settings.rpc_url)
        if need_key:
            self.signer()  # no key: say so before the chain is tried
        with reported(as_json=as_json):
            chain = Chain(
                rpc_url,
                request_timeout_s=self.settings.rpc_timeout_s,
                receipt_timeout_s=self.settings.receipt_timeout_s,
            )
            self.contracts = Contracts.load(
                chain, Deployment.load(deployment or self.settings.deployment_file)
            )

    def signer(self) -> LocalAccount:
        if self.account is None:
            self.fail(missing_key_message("provider", "PROVIDER_KEY"), "missing_key")
        return self.account

    def fail(self, message: str, code: str) -> NoReturn:
        fail(message, code, as_json=self.as_json)

    def get(self, path: str) -> dict[str, Any]:
        """GET one of the gateway's JSON documents; refusals raise GatewayRefused with the gateway's code."""
        try:
            response = httpx.get(self.gateway_url + path, timeout=10.0)
        except httpx.HTTPError as exc:  # refused, timed out, dropped
            raise GatewayRefused(f"{self.gateway_url} unreachable: {exc}", "gateway_unavailable") from exc
        try:
            data: Any = response.json()
        except ValueError:  # a proxy's error page, say
            data = None
        if response.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            error = error if isinstance(error, dict) else {}
            message = error.get("message") or response.reason_phrase
            raise GatewayRefused(
                f"GET {path}: HTTP {response.status_code}: {message}",
                str(error.get("code") or "gateway_error"),
                response.status_code,
            )
        if not isinstance(data, dict):
            raise GatewayRefused(f"GET {path}: the gateway answered no JSON object", "bad_gateway_response")
        return data

    def payout(self, address: str) -> Payout:
        data = self.get(f"/v1/payouts/{address}")
        try:
            root = data.get("root")
            return Payout(
                earned=int(data["earned"]),
                settled=int(data["settled"]),
                claimed=int(data["claimed"]),
                claimable=int(data["claimable"]),
                epoch=None if data.get("epoch") is None else int(data["epoch"]),
                root=bytes.fromhex(str(root).removeprefix("0x")) if root else None,
                cumulative_amount=int(data["cumulativeAmount"]),
                proof=[bytes.fromhex(str(node).removeprefix("0x")) for node in data["proof"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GatewayRefused(
                f"GET /v1/payouts/{address}: not a payout document: {exc!r}", "bad_gateway_response"
            ) from exc


class GatewayRefused(Exception):
    """The gateway could not be reached (``gateway_unavailable``) or refused; ``code`` is its error code."""

    def __init__(self, message: str, code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Payout:
    """A provider's payouts as the gateway accounts them, in base units, with the proof of its latest leaf."""

    earned: int  # every metered earning
    settled: int  # the provider's leaf in the latest posted root (0 when none)
    claimed: int  # already claimed on chain
    claimable: int  # settled - claimed
    epoch: int | None
    root: bytes | None
    cumulative_amount: int
    proof: list[bytes]


def tx_hash(receipt: TxReceipt) -> str:
    return receipt["transactionHash"].to_0x_hex()


def when(timestamp: int, now: int) -> str:
    """A chain time for people, with how far it is from the chain's own now (anvil's clock can run ahead)."""
    at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
    left = timestamp - now
    if left <= 0:
        return f"{at} (passed)"
    hours, rest = divmod(left, 3600)
    return f"{at} (in {hours} h {rest // 60} min)" if hours else f"{at} (in {rest // 60} min {rest % 60} s)"


@app.command("stake")
def stake_command(
    amount: Annotated[str, typer.Argument(help="tokens to bond, e.g. 100 or 12.5")],
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """Bond tokens in StakeManager (approving it first if need be); at least the minimum stake makes you active."""
    units = parse_amount(amount)
    session = ProviderSession(
        key_file=key_file, keystore=keystore, rpc=rpc, deployment=deployment, gateway=gateway, as_json=as_json
    )
    account = session.signer()
    token, stake = session.contracts.token, session.contracts.stake
    with reported(as_json=as_json, reverts=REVERTS):
        balance = token.balance_of(account.address)
        if balance < units:
            session.fail(
                f"{account.address} holds {tokens(balance)} tokens, less than the {tokens(units)} to stake",
                "insufficient_balance",
            )
        before, minimum = stake.stake_of(account.address), stake.min_stake()
        if before.staked + units < minimum:
            session.fail(
                f"staking {tokens(units)} would leave {tokens(before.staked + units)} bonded, below the minimum "
                f"stake of {tokens(minimum)}",
                "stake_below_minimum",
            )
        steps = {
            "approve": f"Approving StakeManager for {tokens(units)} tokens…",
            "stake": f"Staking {tokens(units)} tokens…",
        }
        with console.status(steps["stake"]) as status:
            receipt = bond(
                session.contracts, account, units, progress=lambda step: status.update(steps[step])
            )
        after, active = stake.stake_of(account.address), stake.is_active(account.address)
    if as_json:
        emit_json(
            {
                "provider": account.address,
                "amount": str(units),
                "staked": str(after.staked),
                "active": active,
                "txHash": tx_hash(receipt),
            }
        )
        return
    console.print(
        f"Staked {tokens(units)} tokens: {account.address} has {tokens(after.staked)} bonded"
        f"{' and is active' if active else ''}. [dim](tx {tx_hash(receipt)})[/]"
    )


@app.command("unstake")
def unstake_command(
    amount: Annotated[str, typer.Argument(help="tokens to start unbonding, e.g. 100 or 12.5")],
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start unbonding stake; it stays slashable until the unbonding period ends, then `withdraw` pays it out.

    Unstaking restarts the unbonding clock for everything already unbonding."""
    units = parse_amount(amount)
    session = ProviderSession(
        key_file=key_file, keystore=keystore, rpc=rpc, deployment=deployment, gateway=gateway, as_json=as_json
    )
    account = session.signer()
    stake = session.contracts.stake
    with reported(as_json=as_json, reverts=REVERTS):
        before = stake.stake_of(account.address)
        if units > before.staked:
            session.fail(
                f"cannot unstake {tokens(units)} tokens: {account.address} has {tokens(before.staked)} bonded",
                "unstake_exceeds_stake",
            )
        with console.status(f"Requesting to unstake {tokens(units)} tokens…"):
            receipt = stake.request_unstake(account, amount=units)
        after, active = stake.stake_of(account.address), stake.is_active(account.address)
        now = session.contracts.chain.timestamp()
    if as_json:
        emit_json(
            {
                "provider": account.address,
                "amount": str(units),
                "staked": str(after.staked),
                "unbonding": str(after.unbonding),
                "unbondsAt": after.unbonds_at,
                "active": active,
                "txHash": tx_hash(receipt),
            }
        )
        return
    console.print(
        f"Unbonding {tokens(after.unbonding)} tokens until {when(after.unbonds_at, now)}; run "
        f"`strata provider withdraw` after that. [dim](tx {tx_hash(receipt)})[/]"
    )
    if not active:
        errors.print(
            f"[yellow]{account.address} is no longer active[/]: {tokens(after.staked)} bonded is below the "
            f"minimum stake, so gateways stop matching its asks."
        )


@app.command("withdraw")
def withdraw_command(
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """Withdraw stake whose unbonding period has passed."""
    session = ProviderSession(
        key_file=key_file, keystore=keystore, rpc=rpc, deployment=deployment, gateway=gateway, as_json=as_json
    )
    account = session.signer()
    stake = session.contracts.stake
    with reported(as_json=as_json, reverts=REVERTS):
        state, now = stake.stake_of(account.address), session.contracts.chain.timestamp()
        if state.unbonding == 0:
            session.fail(
                f"{account.address} has nothing unbonding: `strata provider unstake AMOUNT` first",
                "nothing_to_withdraw",
            )
        if now < state.unbonds_at:
            session.fail(
                f"{tokens(state.unbonding)} tokens are still unbonding: they can be withdrawn from "
                f"{when(state.unbonds_at, now)}",
                "unbonding_not_finished",
            )
        with console.status(f"Withdrawing {tokens(state.unbonding)} tokens…"):
            receipt = stake.withdraw(account)
    if as_json:
        emit_json(
            {"provider": account.address, "withdrawn": str(state.unbonding), "txHash": tx_hash(receipt)}
        )
        return
    console.print(f"Withdrew {tokens(state.unbonding)} tokens. [dim](tx {tx_hash(receipt)})[/]")


@app.command("status")
def status_command(
    address: Annotated[str | None, typer.Argument(help="the provider [default: the key's address]")] = None,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """A provider's stake on chain and, from the gateway, its asks, sessions served and payouts."""
    provider = parse_address(address) if address is not None else None
    session = ProviderSession(
        key_file=key_file,
        keystore=keystore,
        rpc=rpc,
        deployment=deployment,
        gateway=gateway,
        as_json=as_json,
        need_key=provider is None,
    )
    provider = provider or session.signer().address
    contracts = session.contracts
    with reported(as_json=as_json):
        state, now = contracts.stake.stake_of(provider), contracts.chain.timestamp()
        report: dict[str, Any] = {
            "provider": provider,
            "staked": str(state.staked),
            "unbonding": str(state.unbonding),
            "unbondsAt": state.unbonds_at or None,
            "active": contracts.stake.is_active(provider),
            "minStake": str(contracts.stake.min_stake()),
            "claimed": str(contracts.distributor.claimed(provider)),
        }
    report["gateway"] = _gateway_figures(session, provider)
    if as_json:
        emit_json(report)
        return
    figures = report["gateway"]
    table = Table(show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("staked", tokens(state.staked))
    unbonds = f" (until {when(state.unbonds_at, now)})" if state.unbonding else ""
    table.add_row("unbonding", tokens(state.unbonding) + unbonds)
    table.add_row("active", "yes" if report["active"] else "[red]no[/]")
    table.add_row("min stake", tokens(int(report["minStake"])))
    if figures["asks"] is not None:
        table.add_row("live asks", f"{figures['asks']}{'' if figures['matchable'] else ' (not matchable)'}")
        table.add_row("sessions served", str(figures["sessionsServed"]))
    for name in ("earned", "claimed", "claimable"):
        value = figures[name] if name != "claimed" else report["claimed"]
        if value is not None:
            table.add_row(name, tokens(int(value)))
    console.print(f"Provider [bold]{provider}[/]", soft_wrap=True)
    console.print(table)
    if figures["error"]:
        errors.print(f"[yellow]gateway figures unavailable[/]: {figures['error']}")


def _gateway_figures(session: ProviderSession, provider: str) -> dict[str, Any]:
    """What the gateway knows of ``provider``; what it could not tell is None, and ``error`` says why."""
    figures: dict[str, Any] = {"url": session.gateway_url, "error": None}
    figures.update(asks=None, matchable=None, sessionsServed=None, earned=None, settled=None, claimable=None)
    problems: list[str] = []
    try:
        view = session.get(f"/v1/providers/{provider}")
        figures.update(
            asks=len(view["asks"]), matchable=bool(view["matchable"]), sessionsServed=view["sessionsServed"]
        )
    except GatewayRefused as exc:
        if exc.code == "unknown_provider":  # no ask posted there yet
            figures.update(asks=0, matchable=False, sessionsServed=0)
        elif exc.code == "gateway_unavailable":
            figures["error"] = str(exc)
            return figures
        else:
            problems.append(str(exc))
    except (KeyError, TypeError) as exc:
        problems.append(f"GET /v1/providers/{provider}: unexpected document: {exc!r}")
    try:
        payout = session.payout(provider)
        figures.update(
            earned=str(payout.earned), settled=str(payout.settled), claimable=str(payout.claimable)
        )
    except GatewayRefused as exc:
        problems.append(str(exc))
    figures["error"] = "; ".join(problems) or None
    return figures


@app.command("claim")
def claim_command(
    for_address: Annotated[
        str | None,
        typer.Option(
            "--for", help="claim for this provider; the key pays the gas [default: the key's address]"
        ),
    ] = None,
    key_file: KeyFileOption = None,
    keystore: KeystoreOption = None,
    rpc: RpcOption = None,
    deployment: DeploymentOption = None,
    gateway: GatewayOption = None,
    as_json: JsonOption = False,
) -> None:
    """Claim a provider's earnings from PayoutDistributor with the proof the gateway serves.

    Anyone may claim for a provider: the tokens always go to the provider."""
    provider = parse_address(for_address) if for_address is not None else None
    session = ProviderSession(
        key_file=key_file, keystore=keystore, rpc=rpc, deployment=deployment, gateway=gateway, as_json=as_json
    )
    sender = session.signer()
    provider = provider or sender.address
    distributor = session.contracts.distributor
    try:
        payout = session.payout(provider)
    except GatewayRefused as exc:
        session.fail(str(exc), exc.code)
    with reported(as_json=as_json, reverts=REVERTS):
        already = distributor.claimed(provider)
        if payout.claimable <= 0 or payout.root is None or payout.cumulative_amount <= already:
            session.fail(
                f"{provider} has nothing to claim: {tokens(already)} claimed of {tokens(payout.settled)} settled "
                f"({tokens(payout.earned)} earned; earnings become claimable once an epoch settles them)",
                "nothing_to_claim",
            )
        with console.status(f"Claiming {tokens(payout.cumulative_amount - already)} tokens for {provider}…"):
            receipt = distributor.claim(
                sender,
                provider=provider,
                cumulative_amount=payout.cumulative_amount,
                proof=payout.proof,
                expected_root=payout.root,
            )
        received = distributor.claimed(provider) - already
    if as_json:
        emit_json(
            {
                "provider": provider,
                "claimed": str(received),
                "cumulativeAmount": str(payout.cumulative_amount),
                "epoch": payout.epoch,
                "txHash": tx_hash(receipt),
            }
        )
        return
    paid_by = f", gas paid by {sender.address}" if sender.address != provider else ""
    console.print(
        f"Claimed {tokens(received)} tokens for {provider}{paid_by}. [dim](tx {tx_hash(receipt)})[/]"
    )
