"""How a payment channel's row changes: the rules of the channel aggregate, in one place.

A row is the marketplace's side of one VoucherEscrow channel. Its figures are cumulative base units:

    voucher_amount   the newest voucher accepted; it only rises
    reserved         quotes of the payer's requests in flight
    acknowledged     what the payer's vouchers authorized, request by request (x402 batch-settlement signs
                     against it)
    charged          what finished requests cost; what settlement may redeem
    claimed          what settlement redeemed on chain; it only rises, and never passes charged

and ``charged + reserved <= voucher_amount`` always (a check constraint): nothing runs that the payer's own
signature does not cover. The four moves:

    reserve   a new voucher above the last, covering everything charged or reserved plus the new quote: it is
              recorded and the quote reserved, in one statement, so two requests can never both spend the
              same headroom (the gateway)
    settle    a finished request releases its quote and adds what it cost (the gateway)
    void      a job a validator failed costs its payer nothing: its charge comes off (the validator)
    claim     a redeemed voucher raises the claimed total (an epoch)

Statements are built once: the first two run on every paid request, and building one costs its cache-key walk.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Update, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from settlement.db.schema import Channel

# Parameters: channel, amount (the voucher), signature, quote, now. No row changes when the voucher is not
# above the last or does not cover the quote.
RESERVE = (
    update(Channel)
    .where(
        Channel.id == bindparam("channel"),
        Channel.voucher_amount < bindparam("amount"),
        Channel.charged + Channel.reserved + bindparam("quote") <= bindparam("amount"),
    )
    .values(
        voucher_amount=bindparam("amount"),
        voucher_signature=bindparam("signature"),
        reserved=Channel.reserved + bindparam("quote"),
        updated_at=bindparam("now"),
    )
    .execution_options(synchronize_session=False)
)

# x402's batch-settlement: one request at a time per channel (nothing reserved), and the voucher must be exactly
# what the payer acknowledged so far plus this quote, as the scheme's client signs it (its cumulative, which the
# answers' chargedAmount builds). Each admitted request acknowledges its whole quote, whatever is metered: then
# every voucher is above every earlier one, and one seen once (in a log, by a proxy) can never pay again. Were a
# request acknowledged at its metered charge, a stranger holding an old voucher could size a request whose quote
# makes it match. Only what is metered is ever claimed; the rest stays in the payer's channel. Parameters as
# RESERVE's.
RESERVE_ONE = (
    update(Channel)
    .where(
        Channel.id == bindparam("channel"),
        Channel.reserved == 0,
        Channel.refunding.is_(None),
        Channel.acknowledged + bindparam("quote") == bindparam("amount"),
        Channel.charged + bindparam("quote") <= bindparam("amount"),
    )
    .values(
        voucher_amount=bindparam("amount"),
        voucher_signature=bindparam("signature"),
        reserved=bindparam("quote"),
        updated_at=bindparam("now"),
    )
    .execution_options(synchronize_session=False)
)

# A batch-settlement payer asks for its unspent deposit back: granted when nothing runs on the channel, no
# refund is under way, and its voucher is for what it was told it was charged. Parameters: channel, amount (0 for
# all), voucher (the refund voucher's amount), now.
REQUEST_REFUND = (
    update(Channel)
    .where(
        Channel.id == bindparam("channel"),
        Channel.reserved == 0,
        Channel.refunding.is_(None),
        Channel.acknowledged == bindparam("voucher"),
    )
    .values(refunding=bindparam("amount"), updated_at=bindparam("now"))
    .execution_options(synchronize_session=False)
)

# Parameters: channel, quote (what was reserved), charged (what the request cost), acknowledged (what the payer
# adds to its cumulative: the charge, or a batch-settlement request's whole quote), now. Returns the channel's
# cumulative charge.
SETTLE = (
    update(Channel)
    .where(Channel.id == bindparam("channel"))
    .values(
        reserved=Channel.reserved - bindparam("quote"),
        charged=Channel.charged + bindparam("charged"),
        acknowledged=Channel.acknowledged + bindparam("acknowledged"),
        updated_at=bindparam("now"),
    )
    .returning(Channel.charged)
)


def open_if_absent(
    dialect: str, *, channel: str, payer: str, scheme: str = "voucher", config: dict[str, Any] | None = None
) -> Any:
    """The row of a channel first paid from, if no other request created it first."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {"id": channel, "payer": payer, "scheme": scheme, "config": config}
    return insert(Channel).values(**values).on_conflict_do_nothing(index_elements=["id"])


def void(channel: str, amount: int) -> Update:
    """A voided job's charge comes off the channel: the payer's signed vouchers cover that much more."""
    return update(Channel).where(Channel.id == channel).values(charged=Channel.charged - amount)


def claim(channel: str, claimed_to: int) -> Update:
    """Settlement redeemed the channel up to ``claimed_to``; an older redemption never lowers the total."""
    return (
        update(Channel).where(Channel.id == channel, Channel.claimed < claimed_to).values(claimed=claimed_to)
    )
