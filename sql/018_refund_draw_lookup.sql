-- A refund finds the draws it returns by index, not by a scan of the whole ledger.
--
-- 017's refund branch looked the deduction's draws up with "transaction_id = X OR transaction_id IN
-- (earlier refunds of X)"; through the view points_lot_draws the OR kept the planner from the primary key
-- on the ledger half, so every refund (refund_generation included) scanned the whole ledger: measured
-- as a parallel sequential scan of 9.5M rows in the 1M-user bench database, and the reason the lifecycle
-- seed's bulk write grew faster than linearly. The ids are now collected first (the user's refund rows by
-- the (user_id, id) index) and matched with = ANY, which both halves of the view answer by index.
-- Everything else is 017's trigger function.

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
                UPDATE public.points_lots l SET remaining = l.remaining + v_taken WHERE l.id = d.lot_id;
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
        v_expires := CASE WHEN jsonb_typeof(v_terms -> 'expires_at') = 'string'
                          THEN (v_terms ->> 'expires_at')::timestamptz END;
        INSERT INTO public.points_lots (id, user_id, source_type, granted, remaining, priority, expires_at,
                                        rollover_cap, rollover_until, created_at)
        VALUES (NEW.id, NEW.user_id, NEW.transaction_type, v_left, v_left,
                coalesce(CASE WHEN jsonb_typeof(v_terms -> 'priority') = 'number'
                              THEN (v_terms ->> 'priority')::integer END,
                         (SELECT s.value::integer FROM public.ledger_settings s WHERE s.name = 'grant_priority'), 50),
                v_expires,
                CASE WHEN v_expires IS NOT NULL AND jsonb_typeof(v_terms -> 'rollover_cap') = 'number'
                     THEN (v_terms ->> 'rollover_cap')::bigint END,
                CASE WHEN v_expires IS NOT NULL AND jsonb_typeof(v_terms -> 'rollover_until') = 'string'
                     THEN (v_terms ->> 'rollover_until')::timestamptz END,
                NEW.created_at);
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
        UPDATE public.points_lots l SET remaining = l.remaining - v_left, expired = l.expired + v_left
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
              WHERE l.user_id = NEW.user_id AND l.remaining > 0
              ORDER BY l.priority, l.expires_at, l.id LOOP
        v_lot := least(d.remaining, v_left - v_taken);
        UPDATE public.points_lots l SET remaining = l.remaining - v_lot WHERE l.id = d.id;
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
