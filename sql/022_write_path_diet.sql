-- Three costs a deduction paid in every statement that writes the balance, the lot and the ledger row,
-- taken out without changing what is refused or what is written (issue 2 and issue 6 benchmarks).
--
-- Measured with callgrind (`python -m benchmarks.instructions`: instructions per call on a single-user
-- backend, the same count for the same work whatever else the machine does), against sql/021:
--   deduct_points 492k -> 452k (-8.1%), many_lots 610k -> 565k; the parts one at a time below.
--
-- 1. points_balances: reserved >= 0 is now a constraint of the column's type (public.ledger_reserved,
--    constraint points_balances_reserved_check), and the table's CHECK points_balances_balance_check
--    says only balance >= reserved. Together they say what 020's one CHECK said (0 <= reserved <=
--    balance, hence balance >= 0). PostgreSQL reads a table CHECK back from its stored text and plans it
--    again in every statement that writes the table (stringToNode in ExecConstraints, ~20k instructions
--    for the two-part expression); a domain's constraint is planned once per backend and is checked only
--    when the column is assigned, which a deduction never does (~-14k a deduction with the next item).
--    The view reserved_mismatches reads the column and is made again unchanged; current_balance returns
--    it through RETURN QUERY, which wants its result types exactly, so it casts it back to bigint.
-- 2. points_transactions_refunds_idx (sql/013) is dropped: a partial index is opened and its predicate
--    set up and tested by every ledger insert (~-6k a deduction), and the refunds the audit reads are
--    found as fast through points_transactions_type_created_idx (transaction_type, created_at), which
--    holds every row but generation deductions (1M-user bench database: 88k refund rows, 40 ms through
--    either index, EXPLAIN ANALYZE warm).
-- 3. points_lots.spent, a stored generated column (remaining = 0) since sql/017, is now a plain boolean
--    column that the functions writing points_lots.remaining set in the same UPDATE (~-20k a lot
--    statement: PostgreSQL reads a generation expression back from its text and plans it in every
--    statement that updates a column it depends on). It exists for the partial index
--    points_lots_open_order_idx (WHERE NOT spent), which keeps a user's spent lots out of the draw
--    order's scan while a draw (a change of remaining only) stays a HOT update. Every writer of
--    remaining is one of these functions: deduct_points (the draws and their undo when the key is
--    taken) and points_lots_follow_ledger (a grant's new lot, a refund back into its lots, an expiry, the
--    walk for rows written by other paths); DESIGN: nothing but the functions writes the lots. A wrong
--    flag could only hide an open lot from the draws (spent with remaining > 0) or keep an empty one in
--    the index (harmless: every draw also asks remaining > 0); tests/test_properties.py checks the flag
--    after every step of its random sequences, and a hand-made repair of remaining must set it too.
--    Cost of this migration: the spent lots are written once (the column is added with its default,
--    then set where remaining = 0) and the partial index is built again, under points_lots' ACCESS
--    EXCLUSIVE lock; points_balances is read once to validate the two constraints (no rewrite: the
--    domain has no constraint while the column's type changes).

-- 1. ------------------------------------------------------------------------------ points_balances
CREATE DOMAIN public.ledger_reserved AS bigint;
COMMENT ON DOMAIN public.ledger_reserved IS
    'points_balances.reserved: credits held by active reservations, never negative (a domain constraint since sql/022)';

DROP VIEW public.reserved_mismatches;
ALTER TABLE public.points_balances
    DROP CONSTRAINT points_balances_balance_check,
    ALTER COLUMN reserved TYPE public.ledger_reserved;
ALTER DOMAIN public.ledger_reserved ADD CONSTRAINT points_balances_reserved_check CHECK (VALUE >= 0);
ALTER TABLE public.points_balances ADD CONSTRAINT points_balances_balance_check CHECK (balance >= reserved);

-- 003's view, as it was
CREATE VIEW public.reserved_mismatches AS
SELECT coalesce(b.user_id, h.user_id) AS user_id, coalesce(b.reserved, 0) AS reserved,
       coalesce(h.held, 0) AS active_holds
  FROM public.points_balances b
  FULL JOIN (SELECT r.user_id, sum(r.amount)::bigint AS held FROM public.points_reservations r
              WHERE r.status = 'active' GROUP BY r.user_id) h ON h.user_id = b.user_id
 WHERE coalesce(b.reserved, 0) <> coalesce(h.held, 0);

-- 011's current_balance with one cast (RETURN QUERY wants bigint, the column is now a domain over it)
CREATE OR REPLACE FUNCTION public.current_balance(p_user_id uuid)
RETURNS TABLE (balance bigint, reserved bigint, spendable bigint, lifetime_earned bigint, lifetime_spent bigint,
               next_expiry timestamptz, updated_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'user id is required' USING ERRCODE = 'CR004';
    END IF;
    PERFORM public.expire_lots_if_due(p_user_id);
    RETURN QUERY SELECT b.balance, b.reserved::bigint, b.balance - b.reserved, b.lifetime_earned, b.lifetime_spent,
                        b.next_expiry, b.updated_at
                   FROM public.points_balances b WHERE b.user_id = p_user_id;
END $$;

-- 2. ------------------------------------------------------------------------ the refunds' own index
DROP INDEX public.points_transactions_refunds_idx;

-- 3. --------------------------------------------------------------------------------- points_lots.spent
DROP INDEX public.points_lots_open_order_idx;
ALTER TABLE public.points_lots DROP COLUMN spent;
ALTER TABLE public.points_lots ADD COLUMN spent boolean NOT NULL DEFAULT false;
UPDATE public.points_lots SET spent = true WHERE remaining = 0;
CREATE INDEX points_lots_open_order_idx ON public.points_lots (user_id, priority, expires_at, id) WHERE NOT spent;
COMMENT ON COLUMN public.points_lots.spent IS
    'remaining = 0; set by the functions that change remaining, in the same UPDATE (sql/022; it was a generated '
    'column): the partial index points_lots_open_order_idx holds the lots that are not spent';
ANALYZE public.points_lots;

-- 017's trigger function with spent set wherever remaining changes (a new lot, a refund, an expiry, the
-- walk); everything else as 017 wrote it.
CREATE OR REPLACE FUNCTION public.points_lots_follow_ledger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_terms jsonb := NEW.metadata -> 'lot';
    v_expires timestamptz;
    v_refund_of bigint;
    v_txs bigint[];
    v_lot bigint;
    v_left bigint;
    v_taken bigint;
    v_ids bigint[] := '{}';
    v_ns bigint[] := '{}';
    d record;
    t record;
BEGIN
    IF NEW.amount > 0 THEN
        IF NEW.transaction_type = 'refund' AND jsonb_typeof(NEW.metadata -> 'refund_of') = 'number' THEN
            v_refund_of := (NEW.metadata ->> 'refund_of')::bigint;
            v_left := NEW.amount;
            -- back to the lots the deduction drew on, the last drawn first, never more than each gave
            -- net of what earlier refunds of the same deduction already returned (refund_generation
            -- allows one; a refund row written through add_points may be a second)
            v_txs := v_refund_of || ARRAY(SELECT r.id FROM public.points_transactions r
                                           WHERE r.user_id = NEW.user_id AND r.id <> NEW.id
                                             AND r.transaction_type = 'refund'
                                             AND r.metadata -> 'refund_of' = NEW.metadata -> 'refund_of');
            FOR d IN SELECT c.lot_id, sum(c.amount)::bigint AS net
                       FROM public.points_lot_draws c
                      WHERE c.transaction_id = ANY (v_txs) AND c.lot_id IS NOT NULL
                      GROUP BY c.lot_id HAVING sum(c.amount) > 0
                      ORDER BY c.lot_id DESC LOOP
                EXIT WHEN v_left = 0;
                v_taken := least(d.net, v_left);
                UPDATE public.points_lots l SET remaining = l.remaining + v_taken, spent = false WHERE l.id = d.lot_id;
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                VALUES (NEW.id, d.lot_id, NEW.user_id, -v_taken, NEW.created_at);
                v_left := v_left - v_taken;
                SELECT l.expires_at INTO v_expires FROM public.points_lots l WHERE l.id = d.lot_id;
                IF v_expires IS NOT NULL THEN
                    UPDATE public.points_balances b SET next_expiry = least(b.next_expiry, v_expires)
                     WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
                END IF;
            END LOOP;
            IF v_left = 0 THEN
                RETURN NULL;
            END IF;
            -- more than the deduction drew (refunds_bounded reports it): the rest is a lot of its own
            v_terms := NULL;
        END IF;
        v_left := coalesce(v_left, NEW.amount);  -- what the new lot holds: all of a grant, a refund's rest
        SELECT * INTO t FROM public.points_lot_terms(v_terms);
        v_expires := t.expires_at;
        INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, spent, priority, expires_at,
                                        rollover_cap, rollover_until, created_at)
        VALUES (NEW.id, NEW.user_id, NEW.transaction_type, v_left, v_left, v_left = 0, t.priority, t.expires_at,
                t.rollover_cap, t.rollover_until, NEW.created_at);
        IF v_expires IS NOT NULL THEN
            UPDATE public.points_balances b SET next_expiry = v_expires
             WHERE b.user_id = NEW.user_id AND (b.next_expiry IS NULL OR b.next_expiry > v_expires);
        END IF;
        RETURN NULL;
    END IF;

    -- a draw
    v_left := -NEW.amount;
    IF NEW.transaction_type = 'expiry' AND jsonb_typeof(NEW.metadata -> 'lot_id') = 'number' THEN
        v_lot := (NEW.metadata ->> 'lot_id')::bigint;
        UPDATE public.points_lots l SET remaining = l.remaining - v_left, expired = l.expired + v_left,
                                         spent = (l.remaining = v_left)
         WHERE l.id = v_lot AND l.user_id = NEW.user_id AND l.remaining >= v_left;
        IF FOUND THEN
            INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
            VALUES (NEW.id, v_lot, NEW.user_id, v_left, NEW.created_at);
            RETURN NULL;
        END IF;
    END IF;
    -- priority, then soonest expiry (none last), then oldest; walk the user's open lots in that order
    -- (the index's order) and stop once the draw is covered: a user with 50 open lots pays for the two
    -- or three a draw touches, not for ranking all 50
    v_taken := 0;
    FOR d IN SELECT l.id, l.remaining FROM public.points_lots l
              WHERE l.user_id = NEW.user_id AND NOT l.spent AND l.remaining > 0
              ORDER BY l.priority, l.expires_at, l.id LOOP
        v_lot := least(d.remaining, v_left - v_taken);
        UPDATE public.points_lots l SET remaining = l.remaining - v_lot, spent = (l.remaining = v_lot)
         WHERE l.id = d.id;
        v_ids := v_ids || d.id;
        v_ns := v_ns || v_lot;
        v_taken := v_taken + v_lot;
        EXIT WHEN v_taken = v_left;
    END LOOP;
    INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
    SELECT NEW.id, x.lot_id, NEW.user_id, x.n, NEW.created_at FROM unnest(v_ids, v_ns) AS x (lot_id, n);
    IF v_taken < v_left THEN
        -- no open lot covers the rest: the lots disagree with the balance; lots_consistent reports it
        INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
        VALUES (NEW.id, NULL, NEW.user_id, v_left - v_taken, NEW.created_at);
    END IF;
    RETURN NULL;
END $$;

-- 021's deduct_points with spent set by the draws and by their undo; everything else as 021 wrote it.
CREATE OR REPLACE FUNCTION public.deduct_points(p_user_id uuid, p_amount bigint, p_transaction_type text,
                                                p_description text, p_idempotency_key text DEFAULT NULL,
                                                p_metadata jsonb DEFAULT '{}'::jsonb)
RETURNS TABLE (new_balance bigint, transaction_id bigint, duplicate boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    v_new bigint;
    v_id bigint;
    v_lot bigint;        -- the first lot drawn
    v_had bigint;        -- what it gave
    v_ids bigint[];      -- several lots: every lot drawn, in draw order
    v_ns bigint[];       -- and how much each gave
    v_left bigint;       -- still to draw
    v_at timestamptz;
    v_constraint text;
BEGIN
    -- the compiled constants are tested here, by plpgsql, not in the UPDATE's WHERE (where they cost a
    -- gating Result node per execution); false still means the slow path, as a row not found did
    IF p_user_id IS NOT NULL AND p_amount > 0 AND length(p_idempotency_key) BETWEEN 1 AND 512
       AND p_amount <= public.ledger_max_operation_amount() AND public.ledger_is_debit_type(p_transaction_type) THEN
        UPDATE public.points_balances b
           SET balance = b.balance - p_amount, lifetime_spent = b.lifetime_spent + p_amount, updated_at = now()
         WHERE b.user_id = p_user_id
           AND b.reserved = 0
           AND b.balance >= p_amount
           AND (b.next_expiry IS NULL OR b.next_expiry > now())
        RETURNING b.balance INTO v_new;

        IF v_new IS NOT NULL THEN
            -- the first open lot in consumption order gives what it has, up to the amount (found by its
            -- ctid: a TID scan, no second index descent; no other writer moves it, see the header)
            UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, p_amount),
                                             spent = (l.remaining <= p_amount)
             WHERE l.ctid = (SELECT x.ctid FROM public.points_lots x
                            WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                            ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
            RETURNING l.id, least(old.remaining, p_amount) INTO v_lot, v_had;
            v_left := p_amount - v_had;
            IF v_left > 0 THEN
                -- several lots: the next ones in the same order, a statement each, until the rest is covered
                v_ids := ARRAY[v_lot];
                v_ns := ARRAY[v_had];
                LOOP
                    UPDATE public.points_lots l SET remaining = l.remaining - least(l.remaining, v_left),
                                                     spent = (l.remaining <= v_left)
                     WHERE l.ctid = (SELECT x.ctid FROM public.points_lots x
                                    WHERE x.user_id = p_user_id AND NOT x.spent AND x.remaining > 0
                                    ORDER BY x.priority, x.expires_at, x.id LIMIT 1)
                    RETURNING l.id, least(old.remaining, v_left) INTO v_lot, v_had;
                    EXIT WHEN v_lot IS NULL;  -- no open lot left: the rest is uncovered (below)
                    v_ids := v_ids || v_lot;
                    v_ns := v_ns || v_had;
                    v_left := v_left - v_had;
                    EXIT WHEN v_left = 0;
                END LOOP;
                v_lot := NULL;
            ELSE
                v_left := 0;  -- covered by one lot, or no open lot at all (the lots trigger records that)
            END IF;
            -- one lot: lot_id; several: lot_ids / lot_amounts; lots that ran out: itemised below with the
            -- uncovered rest; no lot at all: lot_id and lots_drawn NULL, and the lots trigger records it
            -- a taken key is the unique index's refusal, caught (only that one: any other error propagates)
            BEGIN
                INSERT INTO public.points_transactions AS t
                    (user_id, amount, balance_after, transaction_type, description, idempotency_key, metadata,
                     lot_id, lots_drawn, lot_ids, lot_amounts)
                VALUES (p_user_id, -p_amount, v_new, p_transaction_type, p_description, p_idempotency_key,
                        coalesce(p_metadata, '{}'::jsonb), v_lot, CASE WHEN v_ids IS NOT NULL THEN true END,
                        CASE WHEN v_left = 0 THEN v_ids END, CASE WHEN v_left = 0 THEN v_ns END)
                RETURNING t.id, t.created_at INTO v_id, v_at;
            EXCEPTION WHEN unique_violation THEN
                GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
                IF v_constraint IS DISTINCT FROM 'points_transactions_idempotency_key_key' THEN
                    RAISE;
                END IF;
                v_id := NULL;
            END;
            IF v_id IS NOT NULL AND v_left > 0 THEN
                INSERT INTO public.points_lot_consumptions (transaction_id, lot_id, user_id, amount, created_at)
                SELECT v_id, x.lot_id, p_user_id, x.n, v_at
                  FROM unnest(v_ids || NULL::bigint, v_ns || v_left) AS x (lot_id, n);
            END IF;

            IF v_id IS NOT NULL THEN
                new_balance := v_new;
                transaction_id := v_id;
                duplicate := false;
                RETURN NEXT;
                RETURN;
            END IF;

            -- the key is taken: undo the balance and the draws (the rows are still locked by us)
            UPDATE public.points_balances b
               SET balance = b.balance + p_amount, lifetime_spent = b.lifetime_spent - p_amount
             WHERE b.user_id = p_user_id;
            IF v_ids IS NULL THEN
                UPDATE public.points_lots l SET remaining = l.remaining + p_amount, spent = false WHERE l.id = v_lot;
            ELSE
                UPDATE public.points_lots l SET remaining = l.remaining + x.n, spent = false
                  FROM unnest(v_ids, v_ns) AS x (id, n)
                 WHERE l.id = x.id;
            END IF;
            RETURN QUERY SELECT * FROM public.ledger_replay(p_idempotency_key, p_user_id, -p_amount,
                                                            p_transaction_type);
            RETURN;
        END IF;
    END IF;

    PERFORM public.ledger_validate(p_user_id, p_amount, p_transaction_type, (-1)::smallint, p_idempotency_key);
    RETURN QUERY SELECT * FROM public.ledger_apply(p_user_id, -p_amount, p_transaction_type, p_description,
                                                   p_idempotency_key, p_metadata);
END $$;

REVOKE EXECUTE ON FUNCTION public.deduct_points(uuid, bigint, text, text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION public.current_balance(uuid) FROM PUBLIC;
