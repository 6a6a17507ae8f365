/*
 * mod_time: XEP-0202 Entity Time for the server's domains.
 *
 * <iq type='get'><time xmlns='urn:xmpp:time'/></iq> to a served domain is
 * answered with the current UTC time, to the millisecond, and the offset
 * +00:00: clients use it to correct their clock, and the server's own time
 * zone says nothing anyone needs.  A query to a user's full JID is routed to
 * that client as any IQ; a bare JID gets service-unavailable (the core's
 * answer to an IQ nobody handles).
 */
#include <stdio.h>
#include <time.h>

#include <xmppd/module.h>

#define NS_TIME "urn:xmpp:time"

static int
iq_time(xd_event *ev, void *data)
{
    struct timespec ts;
    struct tm tm;
    char utc[80];
    xmpp_stanza_t *res = xd_iq_result(ev->stanza), *t = xd_stanza_new("time", NS_TIME);

    (void)data;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(utc, sizeof(utc), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
             (long)(ts.tv_nsec / 1000000));
    xd_stanza_add_text_child(t, "tzo", "+00:00");
    xd_stanza_add_text_child(t, "utc", utc);
    xmpp_stanza_add_child_ex(res, t, 0);
    xd_route(res);
    return XD_HANDLED;
}

static int
time_load(xd_module *m)
{
    int r = 0;

    r |= xd_iq_register(m, XD_IQ_HOST, "get", NS_TIME, iq_time, NULL);
    r |= xd_disco_add_feature(m, NS_TIME);
    return r ? -1 : 0;
}

XD_MODULE(time) = {
    .abi = XD_MODULE_ABI,
    .name = "time",
    .load = time_load,
};
