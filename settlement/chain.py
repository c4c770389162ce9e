"""Talking to an EVM chain over JSON-RPC: calls, transactions with receipts, and decoded reverts.

Retries are limited to what is safe to repeat. Reads are retried when the endpoint cannot be reached.
A transaction is signed once; if sending it fails in transit, the *same* signed bytes are sent again (it has
one hash, so it can land at most once), and a new transaction is never built in its place. A revert is
raised as :class:`TransactionReverted` with the contract's custom error decoded by name and arguments.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import requests
from eth_abi.abi import decode
from eth_abi.exceptions import DecodingError
from eth_account.signers.local import LocalAccount
from eth_utils.abi import function_signature_to_4byte_selector
from eth_utils.address import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound, Web3RPCError
from web3.types import TxParams, TxReceipt

from settlement.errors import (
    ChainMismatch,
    ChainUnavailable,
    DecodedError,
    TransactionRejected,
    TransactionReverted,
    TransactionTimeout,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUILTIN_ERRORS: dict[bytes, tuple[str, list[str], list[str]]] = {
    function_signature_to_4byte_selector("Error(string)"): ("Error", ["reason"], ["string"]),
    function_signature_to_4byte_selector("Panic(uint256)"): ("Panic", ["code"], ["uint256"]),
}


def _abi_type(entry: dict[str, Any]) -> str:
    """The canonical ABI type of one input, expanding tuples."""
    kind = str(entry["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_abi_type(component) for component in entry["components"])
        return f"({inner}){kind[len('tuple') :]}"
    return kind


@dataclass(frozen=True)
class SignedTransaction:
    """A transaction signed once, to be broadcast (and rebroadcast) as these exact bytes."""

    sender: str
    nonce: int
    tx_hash: str
    raw: bytes
    action: str
    call: dict[str, Any]  # from, to, data: replayed as an eth_call to decode a revert; {} to fetch it


class Chain:
    """One JSON-RPC endpoint, with the custom errors of every contract registered on it."""

    def __init__(
        self,
        rpc_url: str,
        *,
        request_timeout_s: float = 10.0,
        receipt_timeout_s: float = 60.0,
        read_attempts: int = 4,
        retry_backoff_s: float = 0.25,
    ) -> None:
        self.rpc_url = rpc_url
        # web3's own retry layer is off: the retries below are the only ones, and each says why it is safe.
        provider = Web3.HTTPProvider(
            rpc_url, request_kwargs={"timeout": request_timeout_s}, exception_retry_configuration=None
        )
        self.w3 = Web3(provider)
        self.receipt_timeout_s = receipt_timeout_s
        self.read_attempts = read_attempts
        self.retry_backoff_s = retry_backoff_s
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = dict(_BUILTIN_ERRORS)
        self._send_lock = threading.Lock()
        self._chain_id: int | None = None

    # -- reads -------------------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self.read(lambda: int(self.w3.eth.chain_id))
        return self._chain_id

    def expect_chain_id(self, chain_id: int) -> None:
        if self.chain_id != chain_id:
            raise ChainMismatch(f"{self.rpc_url} serves chain {self.chain_id}, expected {chain_id}")

    def read(self, fetch: Callable[[], T]) -> T:
        """Runs a read-only request, retrying with backoff while the endpoint cannot be reached."""
        for attempt in range(1, self.read_attempts + 1):
            try:
                return fetch()
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.read_attempts:
                    raise ChainUnavailable(f"{self.rpc_url} unreachable: {exc}") from exc
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def call(self, fn: ContractFunction, action: str, *, sender: str | None = None) -> Any:
        """eth_call of a contract function (as ``sender``, when given), with reverts decoded."""
        params: TxParams = {"from": to_checksum_address(sender)} if sender is not None else {}
        try:
            return self.read(lambda: fn.call(params))
        except (ContractLogicError, Web3RPCError) as exc:
            raise self._reverted(action, exc) from exc

    def block_number(self) -> int:
        return self.read(lambda: int(self.w3.eth.block_number))

    def timestamp(self) -> int:
        return self.read(lambda: int(self.w3.eth.get_block("latest")["timestamp"]))

    # -- errors ------------------------------------------------------------------------------------------

    def register_errors(self, abi: Iterable[dict[str, Any]]) -> None:
        """Learns the custom errors an ABI declares, so reverts carrying them can be decoded."""
        for entry in abi:
            if entry.get("type") != "error":
                continue
            types = [_abi_type(arg) for arg in entry["inputs"]]
            selector = function_signature_to_4byte_selector(f"{entry['name']}({','.join(types)})")
            self._errors[selector] = (entry["name"], [arg["name"] for arg in entry["inputs"]], types)

    def decode_revert(self, data: bytes) -> DecodedError | None:
        known = self._errors.get(bytes(data[:4]))
        if known is None:
            return None
        name, names, types = known
        try:
            decoded = decode(types, bytes(data[4:]))
        except DecodingError:
            return None
        values = [
            to_checksum_address(v) if t == "address" else v for t, v in zip(types, decoded, strict=True)
        ]
        return DecodedError(name, dict(zip(names, values, strict=True)))

    def _reverted(self, action: str, exc: Exception, tx_hash: str | None = None) -> TransactionReverted:
        raw = _revert_data(exc)
        return TransactionReverted(action, self.decode_revert(raw), tx_hash=tx_hash, raw=raw)

    # -- transactions ------------------------------------------------------------------------------------

    def transact(self, sender: LocalAccount, fn: ContractFunction, action: str) -> TxReceipt:
        """Sends ``fn`` from ``sender`` and waits for its receipt; reverts are raised decoded."""
        with self._send_lock:
            try:
                tx = fn.build_transaction(self._tx_base(sender))
            except (ContractLogicError, Web3RPCError) as exc:
                # Gas estimation simulates the call, so a revert shows up here before anything is sent.
                raise self._reverted(action, exc) from exc
            return self._sign_and_send(sender, tx, action)

    def sign(self, sender: LocalAccount, fn: ContractFunction, action: str) -> SignedTransaction:
        """Builds and signs ``fn`` at the sender's next nonce without sending it; reverts are raised decoded.

        For callers that record the signed bytes before broadcasting them (:mod:`settlement.outbox`).
        """
        with self._send_lock:
            try:
                tx = fn.build_transaction(self._tx_base(sender))
            except (ContractLogicError, Web3RPCError) as exc:
                raise self._reverted(action, exc) from exc
        signed = sender.sign_transaction(cast(dict[str, Any], tx))
        call: dict[str, Any] = {key: tx[key] for key in ("from", "to", "data") if key in tx}
        return SignedTransaction(
            sender.address, int(tx["nonce"]), HexBytes(signed.hash).to_0x_hex(), bytes(signed.raw_transaction),
            action, call,
        )  # fmt: skip

    def broadcast(self, signed: SignedTransaction) -> TxReceipt:
        """Sends signed bytes (again, if need be) and waits for the receipt; a mined revert is raised decoded."""
        tx_hash = HexBytes(signed.tx_hash)
        self._send_raw(signed.raw, tx_hash, signed.action, resend=True)
        receipt = self._wait(tx_hash, signed.action)
        if receipt["status"] != 1:
            call = signed.call or self._call_of(tx_hash)
            raise self._replay_failure(cast(TxParams, call), receipt, signed.action)
        return receipt

    def _call_of(self, tx_hash: HexBytes) -> dict[str, Any]:
        """The from, to and data of a transaction known to the chain (to replay it and decode its revert)."""
        tx = self.read(lambda: self.w3.eth.get_transaction(tx_hash))
        return {"from": tx["from"], "to": tx.get("to"), "data": tx["input"]}

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        """The receipt of a mined transaction, or None while it is pending or unknown."""
        try:
            return self.read(lambda: self.w3.eth.get_transaction_receipt(HexBytes(tx_hash)))
        except TransactionNotFound:
            return None

    def nonce(self, address: str, *, pending: bool = False) -> int:
        """Transactions ``address`` has had mined, or also sent when ``pending``."""
        block: Literal["latest", "pending"] = "pending" if pending else "latest"
        return self.read(lambda: int(self.w3.eth.get_transaction_count(to_checksum_address(address), block)))

    def deploy(self, sender: LocalAccount, abi: list[dict[str, Any]], bytecode: str, *args: Any) -> str:
        """Deploys a contract and returns its address."""
        factory = self.w3.eth.contract(abi=abi, bytecode=bytecode)
        self.register_errors(abi)
        with self._send_lock:
            try:
                tx = factory.constructor(*args).build_transaction(self._tx_base(sender))
            except (ContractLogicError, Web3RPCError) as exc:
                raise self._reverted("deploy", exc) from exc
            receipt = self._sign_and_send(sender, tx, "deploy")
        return str(receipt["contractAddress"])

    def _tx_base(self, sender: LocalAccount) -> TxParams:
        nonce = self.read(lambda: self.w3.eth.get_transaction_count(sender.address, "pending"))
        return {"from": sender.address, "nonce": nonce, "chainId": self.chain_id}

    def _sign_and_send(self, sender: LocalAccount, tx: TxParams, action: str) -> TxReceipt:
        signed = sender.sign_transaction(cast(dict[str, Any], tx))
        tx_hash = HexBytes(signed.hash)
        self._send_raw(signed.raw_transaction, tx_hash, action)
        receipt = self._wait(tx_hash, action)
        if receipt["status"] != 1:
            raise self._replay_failure(tx, receipt, action)
        return receipt

    def _send_raw(self, raw: bytes, tx_hash: HexBytes, action: str, *, resend: bool = False) -> None:
        """``resend``: these bytes may have been broadcast before, so the endpoint knowing them is success."""
        for attempt in range(1, self.read_attempts + 1):
            try:
                self.w3.eth.send_raw_transaction(raw)
                return
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt == self.read_attempts:
                    raise ChainUnavailable(
                        f"{self.rpc_url} unreachable sending {tx_hash.to_0x_hex()}"
                    ) from exc
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            except Web3RPCError as exc:
                # The endpoint may have accepted an earlier attempt whose answer was lost.
                if (attempt > 1 or resend) and self._known(tx_hash):
                    return
                raise TransactionRejected(action, tx_hash.to_0x_hex(), exc.message) from exc

    def _known(self, tx_hash: HexBytes) -> bool:
        try:
            self.w3.eth.get_transaction(tx_hash)
            return True
        except TransactionNotFound:
            return False

    def _wait(self, tx_hash: HexBytes, action: str) -> TxReceipt:
        try:
            return self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.receipt_timeout_s, poll_latency=0.05
            )
        except TimeExhausted as exc:
            raise TransactionTimeout(action, tx_hash.to_0x_hex(), self.receipt_timeout_s) from exc

    def _replay_failure(self, tx: TxParams, receipt: TxReceipt, action: str) -> TransactionReverted:
        """Re-runs a mined, failed transaction as a call on its parent block to recover the revert data."""
        call = cast(TxParams, {key: tx[key] for key in ("from", "to", "data", "value") if key in tx})
        tx_hash = receipt["transactionHash"].to_0x_hex()
        try:
            self.w3.eth.call(call, block_identifier=receipt["blockNumber"] - 1)
        except (ContractLogicError, Web3RPCError) as exc:
            return self._reverted(action, exc, tx_hash)
        return TransactionReverted(action, None, tx_hash=tx_hash)


def _revert_data(exc: Exception) -> bytes:
    """The raw revert bytes a web3 exception carries, wherever this provider put them."""
    data: Any = getattr(exc, "data", None)
    if data is None and isinstance(exc, Web3RPCError) and exc.rpc_response:
        error: Any = exc.rpc_response.get("error") or {}
        data = error.get("data") if isinstance(error, dict) else None
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    if isinstance(data, bytes | bytearray):
        return bytes(data)
    return b""
