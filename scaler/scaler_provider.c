/*
 * scaler_provider: names shared by every provider (see scaler_provider.h).
 */
#include "scaler_provider.h"

const char *scaler_inst_state_name(enum scaler_inst_state s)
{
    switch (s) {
    case SCALER_INST_PROVISIONING:
        return "provisioning";
    case SCALER_INST_RUNNING:
        return "running";
    case SCALER_INST_DRAINING:
        return "draining";
    case SCALER_INST_PARKED:
        return "parked";
    case SCALER_INST_TERMINATED:
        return "terminated";
    case SCALER_INST_FAILED:
        return "failed";
    }
    return "unknown";
}

const char *scaler_provider_ev_name(enum scaler_provider_ev ev)
{
    switch (ev) {
    case SCALER_PROVIDER_EV_PROVISION:
        return "provision";
    case SCALER_PROVIDER_EV_DRAIN:
        return "drain";
    case SCALER_PROVIDER_EV_PARK:
        return "park";
    case SCALER_PROVIDER_EV_UNPARK:
        return "unpark";
    case SCALER_PROVIDER_EV_TERMINATE:
        return "terminate";
    case SCALER_PROVIDER_EV_STATUS:
        return "status";
    case SCALER_PROVIDER_EV_EXIT:
        return "exit";
    }
    return "unknown";
}
